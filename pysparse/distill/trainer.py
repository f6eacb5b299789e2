"""``pysparse.distill``: train a compressed student against its dense teacher with the
transformers ``Trainer``, so accelerate / ``torchrun`` DDP / FSDP scale it unchanged.

Per batch the teacher runs in eval mode under ``torch.no_grad`` (and, with ``bf16=True``, under
bf16 autocast like the student) and the student in train mode;
the loss is the weighted sum of the terms in ``losses`` (pysparse.distill.losses):

* ``"logits"``: KD at ``temperature`` mixed with the hard-label loss by ``alpha`` (when the data
  has labels; models with ``.logits``),
* ``"hidden"``: MSE of mapped hidden states (``layer_map``; a learned projection when the widths
  differ; relative to the teacher state's mean square with ``hidden_relative=True``),
* ``"attention"``: KL of mapped attention maps (switches both models to eager attention, which
  returns the maps),
* ``"embedding"``: 1 - cosine of the mean-pooled last hidden states (sentence embeddings),
* ``"similarity"``: MSE of the in-batch cosine-similarity matrices of those embeddings
  (relational KD: keeps which texts are neighbours),
* ``"neighbours"``: KL of the softmax similarities (``bank_temperature``) to a queue of the
  last ``bank_size`` teacher embeddings (anchor KD, CompRess: ranks neighbours as the
  teacher does).

Default: ``{"logits": 1.0}`` for a model with a head (``...ForSequenceClassification``,
``...ForCausalLM``: logits KD, plus the hard-label loss where the data has labels), else
``{"embedding": 1.0, "hidden": 1.0}``. Pruned weights stay exactly zero
(``prune.schedule.MaskEnforcer``: gradient hooks plus re-masking after every optimizer step).
Fake-quant QAT modules (``pysparse.prepare_qat``) train as they are; ``qat="w8a8"`` switches
them on from ``qat_start`` (a fraction of the steps) on. ``bf16=True`` trains under
bf16 autocast (AMX-BF16 / AVX512-BF16 on CPU, tensor cores on CUDA). Checkpoints go to
``output_dir`` every ``save_steps``; ``resume=True`` continues from the last one.
"""
import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from ..formats import int8 as _int8
from . import losses as L

LOSSES = ("logits", "hidden", "attention", "embedding", "similarity", "neighbours")
_POOLED = ("embedding", "similarity", "neighbours")  # losses on the last hidden state
_WHO = "pysparse.distill"
_PROJ = "pysparse_distill_projection"


@dataclass
class DistillResult:
    steps: int
    seconds: float
    losses: dict
    history: list = field(default_factory=list)  # [{"step", "loss"}], every logging_steps
    output_dir: str = ""
    teacher_cache: dict | None = None  # rows served from the cache / run through the teacher
    qat_step: int | None = None  # the step from which the student trained with fake-quant

    def to_dict(self):
        return self.__dict__.copy()


class _TextData(torch.utils.data.Dataset):
    """Texts tokenized once (so ``group_by_length`` can see their lengths); items carry their
    index (``pysparse_idx``) for the teacher-output cache."""

    def __init__(self, texts, labels, tokenizer, max_length):
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        self.keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        self.enc, self.labels = {k: enc[k] for k in self.keys}, labels

    def __len__(self):
        return len(self.enc["input_ids"])

    def __getitem__(self, i):
        item = {k: self.enc[k][i] for k in self.keys}
        item["pysparse_idx"] = i
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


class _Collate:
    """Pads pre-tokenized items on the right to the longest in the batch (training never needs
    left padding, and with right padding a text's outputs do not depend on its batch, which the
    teacher cache relies on)."""

    def __init__(self, tokenizer):
        self.pad = {"input_ids": tokenizer.pad_token_id or 0, "attention_mask": 0,
                    "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0) or 0}

    def __call__(self, items):
        T = max(len(it["input_ids"]) for it in items)
        batch = {k: torch.tensor([list(it[k]) + [fill] * (T - len(it[k])) for it in items])
                 for k, fill in self.pad.items() if k in items[0]}
        if "attention_mask" not in batch:
            batch["attention_mask"] = torch.tensor(
                [[1] * len(it["input_ids"]) + [0] * (T - len(it["input_ids"])) for it in items])
        batch["pysparse_idx"] = torch.tensor([int(it["pysparse_idx"]) for it in items])
        if "labels" in items[0]:
            batch["labels"] = torch.tensor([int(it["labels"]) for it in items])
        return batch


def _dataset(train_data, tokenizer, max_length):
    """train_data: texts, (text, label) pairs, or a Dataset of tokenized dicts."""
    if isinstance(train_data, torch.utils.data.Dataset) and not isinstance(train_data, list):
        return train_data, None
    items = list(train_data)
    if not items:
        raise ValueError(f"{_WHO}: train_data is empty")
    if tokenizer is None:
        raise ValueError(f"{_WHO}: train_data holds texts; pass tokenizer=")
    if all(isinstance(t, str) for t in items):
        return _TextData(items, None, tokenizer, max_length), tokenizer
    if all(isinstance(t, (tuple, list)) and len(t) == 2 and isinstance(t[0], str) for t in items):
        labels = [t[1] for t in items]
        if not all(isinstance(y, int) for y in labels):
            raise ValueError(f"{_WHO}: labels must be integer class ids (map names to ids "
                             f"first), got e.g. {labels[0]!r}")
        return _TextData([t[0] for t in items], labels, tokenizer, max_length), tokenizer
    raise TypeError(f"{_WHO}: train_data must be a list of texts, of (text, label) pairs, or a "
                    f"torch Dataset of tokenized dicts")


class _TeacherCache:
    """The teacher's outputs per training example, kept for its real tokens only, so after the
    first epoch the teacher runs only for the examples not kept: ``run(teacher, inputs, idx)``
    forwards the teacher on the missing rows alone and assembles the batch. Examples stop
    being kept once ``budget`` bytes are used.

    dtype: how hidden states are kept. "fp16" (fp32 where fp16 would overflow); "int8": per-token
    symmetric int8 with an fp32 absmax scale per token and layer (half the bytes, so twice the
    texts fit; on MiniLM the relative error of a hidden state is ~1.2 %, against ~0.02 % for
    fp16 and a student that is ~20 % off; fp32 for a non-finite output). Logits are always
    fp16 / fp32."""

    DTYPES = ("fp16", "int8")

    def __init__(self, layers, n_hidden, want_logits, budget, dtype="fp16"):
        self.layers, self.n_hidden, self.want_logits = sorted(layers), n_hidden, want_logits
        self.budget, self.bytes, self.store, self.dtype = budget, 0, {}, dtype
        self.rows_cached = self.rows_run = 0

    @staticmethod
    def _pack(x):
        h = x.detach().to(torch.float16)
        return h if torch.isfinite(h).all() else x.detach().float()

    def _pack_hidden(self, x):
        if self.dtype == "fp16":
            return self._pack(x)
        x = x.detach().float()
        if not torch.isfinite(x).all():
            return x
        scale = _int8.symmetric_scale(x.abs().amax(-1))  # the kernels' per-token int8
        return _int8.quantize_rows(x, scale), scale.unsqueeze(-1)

    @staticmethod
    def _unpack(x, device):
        if isinstance(x, tuple):
            q, scale = x
            return q.to(device, torch.float32) * scale.to(device)
        return x.to(device, torch.float32)

    @staticmethod
    def _nbytes(entry):
        return sum(t.numel() * t.element_size() for v in entry.values()
                   for t in (v if isinstance(v, tuple) else (v,)))

    def _entries(self, ids, mask, out):
        """{id: entry} of a teacher output over rows ids with attention mask ``mask``."""
        got = {}
        for b, i in enumerate(ids):
            keep = mask[b].bool()
            entry = {}
            if self.layers:
                entry["h"] = self._pack_hidden(torch.stack(
                    [out.hidden_states[j][b][keep] for j in self.layers]))
            if self.want_logits:
                lg = out.logits[b]
                entry["l"] = self._pack(lg[keep] if out.logits.dim() == 3 else lg)
            got[i] = entry
        return got

    def run(self, teacher, inputs, idx, **kw):
        """The teacher's output for the batch ``inputs`` (right-padded) of examples ``idx``."""
        ids, mask = idx.tolist(), inputs["attention_mask"]
        miss = [b for b, i in enumerate(ids) if i not in self.store]
        fresh = {}
        if miss:
            rows = torch.tensor(miss, device=mask.device)
            T = int(mask[rows].sum(1).max())
            sub = {k: v[rows][:, :T] if torch.is_tensor(v) and v.dim() >= 2 else v
                   for k, v in inputs.items()}
            with torch.no_grad():
                out = teacher(**sub, **kw)
            fresh = self._entries([ids[b] for b in miss], sub["attention_mask"], out)
            for i, entry in fresh.items():
                if self.bytes < self.budget:
                    self.bytes += self._nbytes(entry)
                    self.store[i] = entry
        self.rows_run += len(miss)
        self.rows_cached += len(ids) - len(miss)
        return self._assemble(ids, mask, lambda i: fresh.get(i) or self.store[i])

    def _assemble(self, ids, mask, entry):
        B, T = mask.shape
        keep = mask.bool()
        hidden, logits = [None] * (self.n_hidden + 1), None
        if self.layers:
            first = entry(ids[0])["h"]
            H = (first[0] if isinstance(first, tuple) else first).shape[-1]
            buf = torch.zeros(len(self.layers), B, T, H, device=mask.device)
            for b, i in enumerate(ids):
                buf[:, b, keep[b]] = self._unpack(entry(i)["h"], buf.device)
            for k, j in enumerate(self.layers):
                hidden[j] = buf[k]
        if self.want_logits:
            first = entry(ids[0])["l"]
            if first.dim() == 2:  # per-token logits
                logits = torch.zeros(B, T, first.shape[-1], device=mask.device)
                for b, i in enumerate(ids):
                    logits[b, keep[b]] = entry(i)["l"].to(logits.device, torch.float32)
            else:
                logits = torch.stack([entry(i)["l"] for i in ids]).to(mask.device,
                                                                     torch.float32)
        return SimpleNamespace(hidden_states=hidden, logits=logits)


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

        def __init__(self, *args, teacher, weights, layer_map, temperature, alpha, cache,
                     bank=None, bank_temperature=0.05, hidden_relative=False, **kwargs):
            super().__init__(*args, **kwargs)
            self.hidden_relative = hidden_relative
            self.bank, self.bank_temperature = bank, bank_temperature
            self.teacher, self.weights, self.layer_map = teacher, weights, layer_map
            self.cache = cache
            self.temperature, self.alpha = temperature, alpha
            self.parts = {k: 0.0 for k in weights}
            self.n_parts = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels", None)
            idx = inputs.pop("pysparse_idx", None)
            attn = self.weights.get("attention", 0) > 0
            need_hidden = any(self.weights.get(k, 0) > 0 for k in _POOLED + ("hidden",))
            dev = next(model.parameters()).device
            mask = inputs.get("attention_mask")
            if next(self.teacher.parameters()).device != dev:
                self.teacher.to(dev)
            # the Trainer's bf16 autocast wraps only the student's forward: without this the
            # teacher ran in fp32 (measured inside the Trainer on MiniLM, 32 x ~90 tokens:
            # 0.45-0.55 s per teacher call, 0.24-0.34 s under bf16 autocast; the bf16 outputs
            # are within cosine 0.99999 of the fp32 ones)
            amp = (torch.autocast(dev.type, dtype=torch.bfloat16) if self.args.bf16
                   else contextlib.nullcontext())
            with amp:
                if self.cache is not None and idx is not None and mask is not None:
                    t = self.cache.run(self.teacher, inputs, idx,
                                       output_hidden_states=need_hidden)
                else:
                    with torch.no_grad():
                        t = self.teacher(**inputs, output_hidden_states=need_hidden,
                                         output_attentions=attn)
            s = model(**inputs, output_hidden_states=need_hidden, output_attentions=attn)
            raw = self._unwrap(model)
            total, parts = 0.0, {}
            if self.weights.get("logits", 0) > 0:
                parts["logits"] = L.logit_kd(s.logits, t.logits, labels,
                                             temperature=self.temperature, alpha=self.alpha,
                                             mask=mask if s.logits.dim() == 3 else None)
            if self.weights.get("hidden", 0) > 0:
                parts["hidden"] = L.hidden_mse(s.hidden_states, t.hidden_states, self.layer_map,
                                               mask, getattr(raw, _PROJ, None),
                                               relative=self.hidden_relative)
            if attn:
                amap = [(i - 1, j - 1) for i, j in self.layer_map if i > 0 and j > 0]
                parts["attention"] = L.attention_kl(s.attentions, t.attentions, amap, mask)
            if self.weights.get("embedding", 0) > 0:
                parts["embedding"] = L.embedding_loss(s.hidden_states[-1], t.hidden_states[-1],
                                                      mask)
            if self.weights.get("similarity", 0) > 0:
                parts["similarity"] = L.similarity_loss(s.hidden_states[-1],
                                                        t.hidden_states[-1], mask)
            if self.weights.get("neighbours", 0) > 0:
                t_emb = L.pooled_normalized(t.hidden_states[-1], mask)
                anchors, own = self.bank.anchors(t_emb)
                parts["neighbours"] = L.neighbour_kl(
                    s.hidden_states[-1], t.hidden_states[-1], anchors, mask,
                    temperature=self.bank_temperature, self_bank=own)
                self.bank.push(t_emb)
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


def _use_eager(student_attention, max_length):
    if student_attention not in ("auto", "eager", None):
        raise ValueError(f"{_WHO}: student_attention must be 'auto', 'eager' or None, got "
                         f"{student_attention!r}")
    if student_attention == "auto":
        return not torch.cuda.is_available() and max_length <= 512
    return student_attention == "eager"


def _qat_callback(student, scheme, step):
    """A TrainerCallback that turns the student's linears into fake-quant QATLinear modules
    (in place, the parameters and the optimizer state stay) once ``global_step >= step``; also
    right away when a run resumes from a checkpoint past it."""
    from transformers import TrainerCallback

    from ..quant.qat import prepare_qat

    class QATStart(TrainerCallback):
        done = False

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.done and state.global_step >= step:
                prepare_qat(student, scheme, exclude=("lm_head", f"{_PROJ}.*"))
                self.done = True

    return QATStart()


def distill(student: nn.Module, teacher: nn.Module, train_data, tokenizer=None, *,
            output_dir, losses: dict | None = None, temperature: float = 2.0,
            alpha: float = 0.5, layer_map=None, epochs: float = 1.0, max_steps: int = -1,
            learning_rate: float = 5e-5, batch_size: int = 16, max_length: int = 128,
            warmup_ratio: float = 0.06, weight_decay: float = 0.01, bf16: bool = False,
            enforce_masks: bool = True, resume: bool = False, save_steps: int | None = None,
            logging_steps: int = 25, seed: int = 0, progress: bool = True,
            group_by_length: bool = True, cache_teacher: bool = True, cache_gb: float = 6.0,
            cache_dtype: str = "fp16",
            dropout: bool = True, student_attention: str | None = "auto", callbacks=(),
            qat: str | None = None, qat_start: float = 0.0, bank_size: int = 4096,
            bank_temperature: float = 0.05, hidden_relative: bool = False,
            **training_args) -> DistillResult:
    """Distill ``teacher`` into ``student`` in place (module docstring); returns what was done.

    train_data: texts, (text, int label) pairs, or a torch Dataset of tokenized dicts (then
    tokenizer may be None). layer_map: [(student hidden index, teacher hidden index)] (0 = the
    embeddings output); default ``losses.default_layer_map`` (uniform, so a 3-layer student of
    a 6-layer teacher maps 1->2, 2->4, 3->6). Extra keyword arguments go to
    ``transformers.TrainingArguments`` (e.g. ``gradient_accumulation_steps``, ``fsdp``).

    student_attention: the student's attention implementation while it trains (restored
    after). ``"auto"``: ``"eager"`` when training on the CPU with ``max_length <= 512``
    (measured on MiniLM, batch 32, bf16: torch's CPU flash-attention backward made steps ~17 %
    slower than eager's batched matmuls at these lengths), else unchanged; None: unchanged.
    cache_gb: budget of the teacher-output cache (only what the texts need is used: ~4.6 GiB
    for 11232 texts of the bundled train data with the default losses, at fp16).
    cache_dtype: "fp16" or "int8" (per-token scales: half the bytes, so twice the texts fit in
    ``cache_gb``, at ~1 % error on each cached hidden state; 25227 texts of MiniLM fit in 6 GiB).
    bank_size / bank_temperature: the anchor queue and temperature of the "neighbours" loss.
    hidden_relative: the "hidden" loss divides each mapped layer's MSE by the teacher state's
    mean square (``losses.hidden_mse(relative=True)``), so layers count equally whatever their
    scale (`pysparse compress --distill` turns it on; bench/RESULTS.md).
    qat: "w8a8" to train the student's linear layers with W8A8 fake-quant
    (``pysparse.prepare_qat``) from ``qat_start`` (a fraction of the run's steps, in [0, 1))
    on, so the last steps learn to absorb the rounding of the int8 model it becomes; the layers
    stay QATLinear after training (``pysparse.convert_qat`` or ``replace_linear(model,
    "w8a8")`` / ``"2:4+w8a8"`` turn them into the real kernels). None: no QAT.
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
    dataset, tok = _dataset(train_data, tokenizer, max_length)
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
    L._check_temperature(bank_temperature)
    if cache_dtype not in _TeacherCache.DTYPES:
        raise ValueError(f"{_WHO}: cache_dtype must be one of {_TeacherCache.DTYPES}, got "
                         f"{cache_dtype!r}")
    bank = L.AnchorBank(bank_size) if losses.get("neighbours", 0) > 0 else None
    from ..quant.qat import SCHEMES as _QAT_SCHEMES
    if qat is not None and qat not in _QAT_SCHEMES:
        raise ValueError(f"{_WHO}: qat must be None or one of {_QAT_SCHEMES}, got {qat!r}")
    if not (isinstance(qat_start, (int, float)) and 0 <= qat_start < 1):
        raise ValueError(f"{_WHO}: qat_start must be a fraction of the steps in [0, 1), got "
                         f"{qat_start!r}")
    eager = _use_eager(student_attention, max_length)
    n_s, n_t = _n_hidden(student), _n_hidden(teacher)
    layer_map = [tuple(p) for p in (layer_map or L.default_layer_map(n_s, n_t))]
    L._check_map(layer_map, n_s + 1, n_t + 1, "hidden_map")

    attn = losses.get("attention", 0) > 0
    restore_attn = []
    if attn:
        for m in (student, teacher):
            restore_attn.append((m, m.config._attn_implementation))
            m.set_attn_implementation("eager")
    elif eager:
        impl = getattr(student.config, "_attn_implementation", None)
        if impl not in (None, "eager"):
            try:
                student.set_attn_implementation("eager")
                restore_attn.append((student, impl))
            except (AttributeError, ValueError, NotImplementedError):
                pass  # a model without a switchable implementation trains as it is
    if losses.get("hidden", 0) > 0 and _width(student) != _width(teacher):
        student.add_module(_PROJ, L.HiddenProjection(_width(student), _width(teacher),
                                                     len(layer_map)))
    dropped = [] if dropout else [(m, m.p) for m in student.modules() if isinstance(m, nn.Dropout)]
    for m, _ in dropped:
        m.p = 0.0
    if not any(p.requires_grad for p in student.parameters()):
        raise ValueError(f"{_WHO}: no parameter of the student requires grad; nothing would "
                         f"train (unfreeze it, e.g. student.requires_grad_(True))")
    teacher.eval()
    frozen = [(p, p.requires_grad) for p in teacher.parameters()]  # restored after training
    for p, _ in frozen:
        p.requires_grad_(False)
    enforcer = MaskEnforcer(student) if enforce_masks else None
    callbacks = ([MaskCallback(enforcer)] if enforcer is not None else []) + list(callbacks)
    cache = None
    if cache_teacher and isinstance(dataset, _TextData) and not attn:
        layers = {j for _, j in layer_map} if losses.get("hidden", 0) > 0 else set()
        if any(losses.get(k, 0) > 0 for k in _POOLED):
            layers.add(n_t)
        cache = _TeacherCache(layers, n_t, losses.get("logits", 0) > 0, int(cache_gb * 2 ** 30),
                              cache_dtype)
    if group_by_length and isinstance(dataset, _TextData):
        training_args.setdefault("train_sampling_strategy", "group_by_length")

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
    qat_step = None
    if qat is not None:
        qat_step = int(qat_start * total)
        callbacks.append(_qat_callback(student, qat, qat_step))
    trainer_cls = _make_trainer_class()
    trainer = trainer_cls(model=student, args=args, train_dataset=dataset,
                          data_collator=_Collate(tok) if tok is not None else None,
                          callbacks=callbacks, teacher=teacher, weights=dict(losses),
                          layer_map=layer_map, temperature=temperature, alpha=alpha, cache=cache,
                          bank=bank, bank_temperature=bank_temperature,
                          hidden_relative=bool(hidden_relative))
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
        for m, p in dropped:
            m.p = p
        for p, flag in frozen:
            p.requires_grad_(flag)
    student.eval()
    n = max(trainer.n_parts, 1)
    history = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history
               if "loss" in h]
    return DistillResult(steps=int(state.global_step), seconds=round(time.perf_counter() - t0, 2),
                         losses={k: v / n for k, v in trainer.parts.items()}, history=history,
                         output_dir=str(out), qat_step=qat_step,
                         teacher_cache=None if cache is None else {
                             "rows_cached": cache.rows_cached, "rows_run": cache.rows_run,
                             "texts": len(cache.store), "mb": round(cache.bytes / 2 ** 20, 1)})


__all__ = ["distill", "DistillResult", "LOSSES"]
