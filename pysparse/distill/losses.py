"""Distillation losses: student outputs against a teacher's, in plain torch (autograd, any device).

* ``logit_kd``: Hinton et al. 2015. ``alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) +
  (1 - alpha) * cross_entropy(s, labels)``; the T^2 keeps the soft-target gradients at the
  scale of the hard-label ones when T changes. Without labels only the KD term is used.
* ``hidden_mse``: TinyBERT-style mean squared error between hidden states of mapped layers,
  through a learned linear projection when the widths differ (``HiddenProjection``);
  ``relative=True`` divides each pair's error by the teacher state's mean square, so every
  mapped layer counts the same whatever its scale.
* ``attention_kl``: MiniLM / TinyBERT-style KL between the attention distributions of mapped
  layers, per head (or between head-averaged maps when the head counts differ, e.g. after
  head pruning), over the valid (unpadded) query positions.
* ``embedding_loss``: for sentence-embedding students: ``1 - cos`` (or MSE) between the
  mean-pooled, masked last hidden states of student and teacher.
* ``similarity_loss``: relational KD for sentence-embedding students (Park et al. 2019, RKD):
  MSE between the in-batch cosine-similarity matrices of student and teacher embeddings, so
  the student keeps which texts are neighbours (what retrieval / recall@k measures).

* ``neighbour_kl``: anchor-similarity KD for sentence-embedding students (CompRess): KL between
  the softmax (at a low temperature) of the teacher's and the student's similarities to a bank
  of teacher embeddings of other texts (``AnchorBank``, a queue of recent batches), so the
  student ranks each text's nearest neighbours as the teacher does.

Every loss averages over valid tokens / rows, so padding never counts, and returns a 0-d
tensor. Shapes are checked with clear errors.
"""
import torch
import torch.nn.functional as F
from torch import nn

_WHO = "pysparse.distill"


def _check_temperature(temperature):
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"{_WHO}: temperature must be a positive number, got {temperature!r}")


def logit_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels=None, *,
             temperature: float = 2.0, alpha: float = 0.5, ignore_index: int = -100,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """KD on logits [..., C] (sequence classification [B, C] or token logits [B, S, C]).

    labels: hard labels [...] or None (KD only, alpha ignored). mask: bool [...] of positions
    that count (default: all; labels == ignore_index never count)."""
    _check_temperature(temperature)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{_WHO}.logit_kd: alpha must be in [0, 1], got {alpha!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"{_WHO}.logit_kd: student logits {tuple(student_logits.shape)} and "
                         f"teacher logits {tuple(teacher_logits.shape)} differ")
    C = student_logits.shape[-1]
    s = student_logits.reshape(-1, C).float()
    t = teacher_logits.detach().reshape(-1, C).float()
    keep = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    if mask is not None:
        keep &= mask.reshape(-1).bool()
    if labels is not None:
        labels = labels.reshape(-1)
        if labels.shape[0] != s.shape[0]:
            raise ValueError(f"{_WHO}.logit_kd: {labels.shape[0]} labels for {s.shape[0]} rows")
        keep &= labels != ignore_index
    n = keep.sum().clamp_min(1)
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                  reduction="none", log_target=True).sum(-1)
    kd = (kl * keep).sum() / n * temperature ** 2
    if labels is None:
        return kd
    ce = F.cross_entropy(s, labels.clamp_min(0), reduction="none")
    return alpha * kd + (1 - alpha) * (ce * keep).sum() / n


class HiddenProjection(nn.Module):
    """Learned linear maps student width -> teacher width, one per mapped layer (TinyBERT's
    W_h); identity (no parameters) where the widths are equal."""

    def __init__(self, student_dim: int, teacher_dim: int, n_layers: int):
        super().__init__()
        self.student_dim, self.teacher_dim = int(student_dim), int(teacher_dim)
        self.proj = nn.ModuleList(
            [nn.Linear(student_dim, teacher_dim, bias=False) for _ in range(n_layers)]
            if student_dim != teacher_dim else [])

    def forward(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return self.proj[i](h) if len(self.proj) else h


def default_layer_map(n_student: int, n_teacher: int) -> list:
    """Uniform map of hidden-state indices (0 = embeddings output, i = layer i's output):
    student layer i <- teacher layer round(i * n_teacher / n_student); 0 <- 0, last <- last."""
    if n_student < 1 or n_teacher < 1:
        raise ValueError(f"{_WHO}: layer counts must be positive, got {n_student}, {n_teacher}")
    return [(i, round(i * n_teacher / n_student)) for i in range(n_student + 1)]


def _check_map(layer_map, n_s, n_t, what):
    for i, j in layer_map:
        if not (0 <= i < n_s and 0 <= j < n_t):
            raise ValueError(f"{_WHO}.{what}: layer map entry ({i}, {j}) is out of range for "
                             f"{n_s} student and {n_t} teacher {what.split('_')[0]} tensors")


def hidden_mse(student_hidden, teacher_hidden, layer_map, mask=None,
               projection: HiddenProjection | None = None, relative: bool = False) -> torch.Tensor:
    """Mean over mapped pairs of the MSE between student hidden state i (projected) and teacher
    hidden state j, over valid tokens. hidden: sequences of [B, S, H]; mask: [B, S] (1 = real).

    relative: each pair's MSE is divided by the mean square of the teacher state over the same
    tokens (a relative squared error; the divisor carries no gradient). Plain MSE weighs layers
    by their scale: in MiniLM the last layer, the one that makes the sentence embedding, has
    ~1/5 of the mean square of the middle layers and so ~1/5 of their weight."""
    _check_map(layer_map, len(student_hidden), len(teacher_hidden), "hidden_mse")
    m = mask.float() if mask is not None else None

    def token_mean(x):  # mean over the valid tokens of a [B, S] tensor
        return x.mean() if m is None else (x * m).sum() / m.sum().clamp_min(1)

    total = 0.0
    for k, (i, j) in enumerate(layer_map):
        s, t = student_hidden[i].float(), teacher_hidden[j].detach().float()
        if projection is not None:
            s = projection(k, s)
        if s.shape != t.shape:
            raise ValueError(f"{_WHO}.hidden_mse: student hidden {i} {tuple(s.shape)} vs teacher "
                             f"hidden {j} {tuple(t.shape)}; pass a HiddenProjection when the "
                             f"widths differ")
        err = token_mean((s - t).pow(2).mean(-1))
        if relative:
            err = err / token_mean(t.pow(2).mean(-1)).clamp_min(1e-12)
        total = total + err
    return total / max(len(layer_map), 1)


def attention_kl(student_attn, teacher_attn, layer_map, mask=None) -> torch.Tensor:
    """Mean over mapped layers of KL(teacher || student) of attention rows [B, h, S, S] (rows
    sum to 1), averaged over valid query positions and heads; head-averaged when the head
    counts differ."""
    _check_map(layer_map, len(student_attn), len(teacher_attn), "attention_kl")
    total = 0.0
    for i, j in layer_map:
        s, t = student_attn[i], teacher_attn[j]
        if s is None or t is None:
            raise ValueError(f"{_WHO}.attention_kl: attention maps are missing (run the models "
                             f"with output_attentions=True and eager attention)")
        s, t = s.float(), t.detach().float()
        if s.shape[1] != t.shape[1]:
            s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
        if s.shape != t.shape:
            raise ValueError(f"{_WHO}.attention_kl: student attention {i} {tuple(s.shape)} vs "
                             f"teacher attention {j} {tuple(t.shape)}")
        kl = (t * (t.clamp_min(1e-12).log() - s.clamp_min(1e-12).log())).sum(-1)  # [B, h, S]
        if mask is not None:
            m = mask.float()[:, None, :]
            total = total + (kl * m).sum() / (m.sum() * kl.shape[1]).clamp_min(1)
        else:
            total = total + kl.mean()
    return total / max(len(layer_map), 1)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return hidden.mean(1)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def embedding_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask=None,
                   kind: str = "cosine") -> torch.Tensor:
    """Sentence-embedding loss between mean-pooled last hidden states [B, S, H]:
    "cosine" = mean(1 - cos), "mse" = MSE of the L2-normalised embeddings."""
    if kind not in ("cosine", "mse"):
        raise ValueError(f"{_WHO}.embedding_loss: kind must be 'cosine' or 'mse', got {kind!r}")
    if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
        raise ValueError(f"{_WHO}.embedding_loss: widths {student_hidden.shape[-1]} and "
                         f"{teacher_hidden.shape[-1]} differ")
    s = mean_pool(student_hidden.float(), mask)
    t = mean_pool(teacher_hidden.detach().float(), mask)
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    return (F.normalize(s, dim=-1) - F.normalize(t, dim=-1)).pow(2).sum(-1).mean()


def similarity_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                    mask=None) -> torch.Tensor:
    """MSE between the off-diagonal in-batch cosine-similarity matrices [B, B] of the
    mean-pooled last hidden states [B, S, H] of student and teacher (0 for a batch of one)."""
    if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
        raise ValueError(f"{_WHO}.similarity_loss: widths {student_hidden.shape[-1]} and "
                         f"{teacher_hidden.shape[-1]} differ")
    B = student_hidden.shape[0]
    if B < 2:
        return student_hidden.sum() * 0.0
    s = F.normalize(mean_pool(student_hidden.float(), mask), dim=-1)
    t = pooled_normalized(teacher_hidden, mask)
    off = ~torch.eye(B, dtype=torch.bool, device=s.device)
    return (s @ s.T - t @ t.T)[off].pow(2).mean()


def neighbour_kl(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, bank: torch.Tensor,
                 mask=None, temperature: float = 0.05, self_bank: bool = False) -> torch.Tensor:
    """Anchor-similarity KD for sentence embeddings (CompRess, Abbasi Koohpayegani et al.
    2020): KL(softmax(t . bank / T) || softmax(s . bank / T)), batch mean, where s and t are the
    L2-normalised mean-pooled last hidden states [B, S, H] of student and teacher and ``bank``
    [K, H] holds L2-normalised teacher embeddings of other texts. A small temperature puts the
    weight on each text's nearest anchors, so the student learns to rank its neighbours as
    the teacher does (what nearest-neighbour recall measures), not only to point the same way.
    self_bank: ``bank`` is the batch's own teacher embeddings (row i is text i): each text's
    own anchor is left out (it would take all the weight)."""
    _check_temperature(temperature)
    if not (student_hidden.shape[-1] == teacher_hidden.shape[-1] == bank.shape[-1]):
        raise ValueError(f"{_WHO}.neighbour_kl: widths {student_hidden.shape[-1]}, "
                         f"{teacher_hidden.shape[-1]} and bank {bank.shape[-1]} differ")
    if bank.dim() != 2 or bank.shape[0] < 1:
        raise ValueError(f"{_WHO}.neighbour_kl: bank must be [K >= 1, H], got {tuple(bank.shape)}")
    B = student_hidden.shape[0]
    if self_bank and bank.shape[0] != B:
        raise ValueError(f"{_WHO}.neighbour_kl: self_bank needs one anchor per row, got "
                         f"{bank.shape[0]} anchors for {B} rows")
    if self_bank and B < 2:  # no other text to rank
        return student_hidden.sum() * 0.0
    s = F.normalize(mean_pool(student_hidden.float(), mask), dim=-1)
    t = pooled_normalized(teacher_hidden, mask)
    bank = bank.detach().float()
    ls, lt = s @ bank.T / temperature, t @ bank.T / temperature
    if self_bank:
        eye = torch.eye(B, dtype=torch.bool, device=s.device)
        ls, lt = ls.masked_fill(eye, -1e4), lt.masked_fill(eye, -1e4)
    return F.kl_div(F.log_softmax(ls, -1), F.log_softmax(lt, -1), reduction="batchmean",
                    log_target=True)


class AnchorBank:
    """FIFO of the last ``size`` L2-normalised teacher embeddings (MoCo-style queue), the
    anchors of ``neighbour_kl``. ``anchors(t)`` returns (anchors, self_bank): the queue (earlier
    batches, so never the texts themselves), or while it is empty the batch's own embeddings
    ``t`` (``neighbour_kl(..., self_bank=True)`` then leaves each text's own one out)."""

    def __init__(self, size: int = 4096):
        if not (isinstance(size, int) and size >= 0):
            raise ValueError(f"{_WHO}: bank size must be an int >= 0, got {size!r}")
        self.size, self.queue = size, None

    def anchors(self, t: torch.Tensor):
        return (t, True) if self.queue is None else (self.queue.to(t.device), False)

    def push(self, t: torch.Tensor):
        t = t.detach().float()
        q = t if self.queue is None else torch.cat([t, self.queue.to(t.device)])
        self.queue = q[:self.size] if self.size else None


def pooled_normalized(hidden: torch.Tensor, mask=None) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings [B, H] of hidden states [B, S, H], fp32, no grad."""
    return F.normalize(mean_pool(hidden.detach().float(), mask), dim=-1)


__all__ = ["logit_kd", "hidden_mse", "attention_kl", "embedding_loss", "similarity_loss",
           "neighbour_kl", "AnchorBank", "mean_pool", "HiddenProjection", "default_layer_map"]
