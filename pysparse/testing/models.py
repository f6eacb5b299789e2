"""Tiny random transformers models for tests (2 layers, hidden 64, 4 heads; Llama with 2 kv
heads, i.e. grouped-query attention), built from configs: nothing is downloaded."""
import transformers


def tiny_gpt2(**kw):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32, **kw)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_bert(**kw):
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=128, max_position_embeddings=32, **kw)
    return transformers.BertModel(cfg).eval()


def tiny_llama(**kw):
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=160, vocab_size=128,
                                   max_position_embeddings=32, **kw)
    return transformers.LlamaForCausalLM(cfg).eval()


ARCHS = {"gpt2": tiny_gpt2, "bert": tiny_bert, "llama": tiny_llama}
