"""``pysparse.distill``: train a compressed student against its dense teacher with the
transformers ``Trainer``, so accelerate / ``torchrun`` DDP / FSDP scale it unchanged.

Per batch the teacher runs in eval mode under ``torch.no_grad`` and the student in train mode;
the loss is the weighted sum of the terms in ``losses`` (pysparse.distill.losses):

* ``"logits"``: KD at ``temperature`` mixed with the hard-label loss by ``alpha`` (when the data
  has labels; models with ``.logits``),
* ``"hidden"``: MSE of mapped hidden states (``layer_map``; a learned projection when the widths
  differ),
* ``"attention"``: KL of mapped attention maps (switches both models to eager attention, which
  returns the maps),
* ``"embedding"``: 1 - cosine of the mean-pooled last hidden states (sentence embeddings).

Default: ``{"logits": 1.0}`` for a model with a head (``...ForSequenceClassification``,
``...ForCausalLM``: logits KD, plus the hard-label loss where the data has labels), else
``{"embedding": 1.0, "hidden": 1.0}``. Pruned weights stay exactly zero
(``prune.schedule.MaskEnforcer``: gradient hooks plus re-masking after every optimizer step).
Fake-quant QAT modules (``pysparse.prepare_qat``) train as they are. ``bf16=True`` trains under
bf16 autocast (AMX-BF16 / AVX512-BF16 on CPU, tensor cores on CUDA). Checkpoints go to
``output_dir`` every ``save_steps``; ``resume=True`` continues from the last one.
"""
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import losses as L

LOSSES = ("logits", "hidden", "attention", "embedding")
_WHO = "pysparse.distill"
_PROJ = "pysparse_distill_projection"


@dataclass
class DistillResult:
    steps: int
    seconds: float
    losses: dict
    history: list = field(default_factory=list)  # [{"step", "loss"}], every logging_steps
    output_dir: str = ""

    def to_dict(self):
        return self.__dict__.copy()


class _TextData(torch.utils.data.Dataset):
    def __init__(self, texts, labels):
        self.texts, self.labels = list(texts), labels

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        item = {"text": self.texts[i]}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


class _Collate:
    def __init__(self, tokenizer, max_length):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items):
        batch = dict(self.tokenizer([it["text"] for it in items], padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt"))
        if "labels" in items[0]:
            batch["labels"] = torch.tensor([int(it["labels"]) for it in items])
        return batch


def _dataset(train_data, tokenizer):
    """train_data: texts, (text, label) pairs, or a Dataset of tokenized dicts."""
    if isinstance(train_data, torch.utils.data.Dataset) and not isinstance(train_data, list):
        return train_data, None
    items = list(train_data)
    if not items:
        raise ValueError(f"{_WHO}: train_data is empty")
    if tokenizer is None:
        raise ValueError(f"{_WHO}: train_data holds texts; pass tokenizer=")
    if all(isinstance(t, str) for t in items):
        return _TextData(items, None), tokenizer
    if all(isinstance(t, (tuple, list)) and len(t) == 2 and isinstance(t[0], str) for t in items):
        labels = [t[1] for t in items]
        if not all(isinstance(y, int) for y in labels):
            raise ValueError(f"{_WHO}: labels must be integer class ids (map names to ids "
                             f"first), got e.g. {labels[0]!r}")
        return _TextData([t[0] for t in items], labels), tokenizer
    raise TypeError(f"{_WHO}: train_data must be a list of texts, of (text, label) pairs, or a "
                    f"torch Dataset of tokenized dicts")


def _n_hidden(model):
    cfg = model.config
    return getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer")


def _width(model):
    cfg = model.config
    return getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")


def _has_shared_modules(model):
    seen = set()
    for _, m in model.named_modules(remove_duplicate=False):
        if id(m) in seen and any(True for _ in m.parameters(recurse=False)):
            return True
        seen.add(id(m))
    return False


def _make_trainer_class():
    from transformers import Trainer

    class DistillTrainer(Trainer):
        """Trainer whose loss is the distillation loss against ``self.teacher``."""

        def __init__(self, *args, teacher, weights, layer_map, temperature, alpha, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher, self.weights, self.layer_map = teacher, weights, layer_map
            self.temperature, self.alpha = temperature, alpha
            self.parts = {k: 0.0 for k in weights}
            self.n_parts = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels", None)
            attn = self.weights.get("attention", 0) > 0
            need_hidden = any(self.weights.get(k, 0) > 0 for k in ("hidden", "embedding"))
            dev = next(model.parameters()).device
            if next(self.teacher.parameters()).device != dev:
                self.teacher.to(dev)
            with torch.no_grad():
                t = self.teacher(**inputs, output_hidden_states=need_hidden,
                                 output_attentions=attn)
            s = model(**inputs, output_hidden_states=need_hidden, output_attentions=attn)
            mask = inputs.get("attention_mask")
            raw = self._unwrap(model)
            total, parts = 0.0, {}
            if self.weights.get("logits", 0) > 0:
                parts["logits"] = L.logit_kd(s.logits, t.logits, labels,
                                             temperature=self.temperature, alpha=self.alpha,
                                             mask=mask if s.logits.dim() == 3 else None)
            if self.weights.get("hidden", 0) > 0:
                parts["hidden"] = L.hidden_mse(s.hidden_states, t.hidden_states, self.layer_map,
                                               mask, getattr(raw, _PROJ, None))
            if attn:
                amap = [(i - 1, j - 1) for i, j in self.layer_map if i > 0 and j > 0]
                parts["attention"] = L.attention_kl(s.attentions, t.attentions, amap, mask)
            if self.weights.get("embedding", 0) > 0:
                parts["embedding"] = L.embedding_loss(s.hidden_states[-1], t.hidden_states[-1],
                                                      mask)
            for k, v in parts.items():
                total = total + self.weights[k] * v
                self.parts[k] += float(v.detach())
            self.n_parts += 1
            return (total, s) if return_outputs else total

        # save_pretrained refuses modules shared between blocks (share_layers): checkpoints of
        # such a model are written / read with safetensors' save_model / load_model, which
        # store each shared tensor once
        def _save(self, output_dir=None, state_dict=None):
            raw = self._unwrap(self.model)
            if not _has_shared_modules(raw):
                return super()._save(output_dir, state_dict)
            if not self.args.should_save:
                return None
            from safetensors.torch import save_model
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            save_model(raw, os.path.join(output_dir, "model.safetensors"))
            return None

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            raw = self._unwrap(model if model is not None else self.model)
            if not _has_shared_modules(raw):
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            from safetensors.torch import load_model
            load_model(raw, os.path.join(resume_from_checkpoint, "model.safetensors"))
            return None

        @staticmethod
        def _unwrap(model):
            while hasattr(model, "module") and isinstance(model.module, nn.Module):
                model = model.module
            return model

    return DistillTrainer


def distill(student: nn.Module, teacher: nn.Module, train_data, tokenizer=None, *,
            output_dir, losses: dict | None = None, temperature: float = 2.0,
            alpha: float = 0.5, layer_map=None, epochs: float = 1.0, max_steps: int = -1,
            learning_rate: float = 5e-5, batch_size: int = 16, max_length: int = 128,
            warmup_ratio: float = 0.06, weight_decay: float = 0.01, bf16: bool = False,
            enforce_masks: bool = True, resume: bool = False, save_steps: int | None = None,
            logging_steps: int = 25, seed: int = 0, progress: bool = True,
            **training_args) -> DistillResult:
    """Distill ``teacher`` into ``student`` in place (module docstring); returns what was done.

    train_data: texts, (text, int label) pairs, or a torch Dataset of tokenized dicts (then
    tokenizer may be None). layer_map: [(student hidden index, teacher hidden index)] (0 = the
    embeddings output); default ``losses.default_layer_map`` (uniform, so a 3-layer student of
    a 6-layer teacher maps 1->2, 2->4, 3->6). Extra keyword arguments go to
    ``transformers.TrainingArguments`` (e.g. ``gradient_accumulation_steps``, ``fsdp``).
    """
    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from ..prune.schedule import MaskCallback, MaskEnforcer
    for name, m in (("student", student), ("teacher", teacher)):
        if not isinstance(m, nn.Module) or not hasattr(m, "config"):
            raise TypeError(f"{_WHO}: {name} must be a transformers model, got "
                            f"{type(m).__name__}")
    if student is teacher:
        raise ValueError(f"{_WHO}: student and teacher are the same object; distill a copy "
                         f"(copy.deepcopy(teacher)) that you then compress")
    dataset, tok = _dataset(train_data, tokenizer)
    if losses is None:
        losses = ({"logits": 1.0} if "For" in type(student).__name__  # a head with logits
                  else {"embedding": 1.0, "hidden": 1.0})
    unknown = sorted(set(losses) - set(LOSSES))
    if unknown:
        raise ValueError(f"{_WHO}: unknown loss(es) {unknown}; choose from {LOSSES}")
    bad = {k: v for k, v in losses.items() if not (isinstance(v, (int, float)) and v >= 0
                                                  and math.isfinite(v))}
    if bad or not any(losses.values()):
        raise ValueError(f"{_WHO}: loss weights must be finite, >= 0 and not all 0, got {losses}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"{_WHO}: alpha must be in [0, 1], got {alpha}")
    L._check_temperature(temperature)
    n_s, n_t = _n_hidden(student), _n_hidden(teacher)
    layer_map = [tuple(p) for p in (layer_map or L.default_layer_map(n_s, n_t))]
    L._check_map(layer_map, n_s + 1, n_t + 1, "hidden_map")

    attn = losses.get("attention", 0) > 0
    restore_attn = []
    if attn:
        for m in (student, teacher):
            restore_attn.append((m, m.config._attn_implementation))
            m.set_attn_implementation("eager")
    if losses.get("hidden", 0) > 0 and _width(student) != _width(teacher):
        student.add_module(_PROJ, L.HiddenProjection(_width(student), _width(teacher),
                                                     len(layer_map)))
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    enforcer = MaskEnforcer(student) if enforce_masks else None
    callbacks = [MaskCallback(enforcer)] if enforcer is not None else []

    out = Path(output_dir)
    steps_per_epoch = max(1, math.ceil(len(dataset) / batch_size))
    total = max_steps if max_steps > 0 else math.ceil(steps_per_epoch * epochs)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=batch_size, learning_rate=learning_rate,
        num_train_epochs=epochs, max_steps=max_steps, warmup_steps=int(warmup_ratio * total),
        weight_decay=weight_decay, lr_scheduler_type="linear", logging_steps=logging_steps,
        save_strategy="steps", save_steps=save_steps or max(1, total // 2), save_total_limit=2,
        report_to="none", disable_tqdm=not progress, seed=seed, bf16=bf16,
        use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
        dataloader_num_workers=0, ddp_find_unused_parameters=True,
        **({"ddp_backend": "gloo"} if not torch.cuda.is_available()
           and int(os.environ.get("WORLD_SIZE", "1")) > 1 else {}),
        **training_args)
    trainer_cls = _make_trainer_class()
    trainer = trainer_cls(model=student, args=args, train_dataset=dataset,
                          data_collator=_Collate(tok, max_length) if tok is not None else None,
                          callbacks=callbacks, teacher=teacher, weights=dict(losses),
                          layer_map=layer_map, temperature=temperature, alpha=alpha)
    ckpt = get_last_checkpoint(str(out)) if resume and out.is_dir() else None
    t0 = time.perf_counter()
    try:
        state = trainer.train(resume_from_checkpoint=ckpt)
    finally:
        if enforcer is not None:
            enforcer.apply()
            enforcer.remove()
        if hasattr(student, _PROJ):
            delattr(student, _PROJ)
        for m, impl in restore_attn:
            m.set_attn_implementation(impl)
    student.eval()
    n = max(trainer.n_parts, 1)
    history = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history
               if "loss" in h]
    return DistillResult(steps=int(state.global_step), seconds=round(time.perf_counter() - t0, 2),
                         losses={k: v / n for k, v in trainer.parts.items()}, history=history,
                         output_dir=str(out))


__all__ = ["distill", "DistillResult", "LOSSES"]
