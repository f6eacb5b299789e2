"""Calibration data: the one convention every data-driven method takes (prune, calibrate, smooth,
QAT/distill helpers).

``calib`` is either an iterable of tokenized batches (dicts of tensors, e.g. what a tokenizer
returns with ``return_tensors="pt"``; ``input_ids`` required, ``attention_mask`` and other model
inputs passed through), or a list of strings together with ``tokenizer=`` (tokenized here in
batches of ``batch_size``, padded, truncated to ``max_length``). Bad input gets a clear
ValueError / TypeError naming the caller, never a silent empty calibration.
"""
from contextlib import contextmanager
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm


def batches(calib, tokenizer=None, *, who: str = "pysparse", batch_size: int = 8,
            max_length: int = 128, min_samples: int = 1) -> list:
    """Normalize ``calib`` to a list of dicts of tensors; checks shapes and the sample count."""
    if calib is None:
        raise ValueError(f"{who}: this method needs calibration data: pass calib= a list of "
                         f"strings with tokenizer=, or an iterable of tokenized batches")
    if isinstance(calib, str):
        raise TypeError(f"{who}: calib must be a list of strings or of tokenized batches, not "
                        f"one string")
    if isinstance(calib, dict):
        calib = [calib]
    items = list(calib) if isinstance(calib, Iterable) else None
    if items is None:
        raise TypeError(f"{who}: calib must be iterable, got {type(calib).__name__}")
    if not items:
        raise ValueError(f"{who}: calib is empty")
    if all(isinstance(t, str) for t in items):
        if tokenizer is None:
            raise ValueError(f"{who}: calib is a list of strings; pass tokenizer= to tokenize "
                             f"it (or pass tokenized batches)")
        out = [dict(tokenizer(items[i:i + batch_size], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt"))
               for i in range(0, len(items), batch_size)]
    else:
        out = []
        for i, b in enumerate(items):
            if not isinstance(b, dict) and hasattr(b, "keys"):  # BatchEncoding
                b = dict(b)
            if not isinstance(b, dict) or "input_ids" not in b:
                raise TypeError(f"{who}: calib batch {i} must be a dict with 'input_ids' (a "
                                f"tokenized batch), got {type(b).__name__}")
            ids = b["input_ids"]
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0:
                raise ValueError(f"{who}: calib batch {i}: input_ids must be a non-empty 2-D "
                                 f"tensor [batch, seq]")
            for k, v in b.items():
                if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[:2] != ids.shape:
                    raise ValueError(f"{who}: calib batch {i}: {k} has shape {tuple(v.shape)}, "
                                     f"input_ids {tuple(ids.shape)}")
            out.append(b)
    n = sum(b["input_ids"].shape[0] for b in out)
    if n < min_samples:
        raise ValueError(f"{who}: calib has {n} samples; this method needs at least "
                         f"{min_samples}")
    return out


def device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def run(model: nn.Module, data: list, *, desc: str = "calibrating", progress: bool = True,
        grad: bool = False, loss_fn=None):
    """Run ``model`` over every batch (eval mode, no grad unless ``grad``). With ``grad``, calls
    ``loss_fn(model, batch, outputs)`` (default: the model's own ``.loss`` when it has labels,
    else the mean squared hidden state) and ``backward()`` per batch. Restores train/eval mode."""
    dev = device_of(model)
    was_training = model.training
    model.eval()
    try:
        for b in tqdm(data, desc=desc, disable=not progress, leave=False):
            b = to_device(b, dev)
            if not grad:
                with torch.no_grad():
                    model(**b)
                continue
            out = model(**b)
            loss = loss_fn(model, b, out) if loss_fn is not None else default_loss(out)
            loss.backward()
    finally:
        model.train(was_training)


def default_loss(out) -> torch.Tensor:
    """The model's loss when it computed one, else the mean square of its last hidden state (a
    label-free objective whose gradient measures how much each weight moves the output)."""
    loss = getattr(out, "loss", None)
    if loss is not None:
        return loss
    h = getattr(out, "last_hidden_state", None)
    if h is None:
        h = getattr(out, "logits", None)
    if h is None:
        h = out[0] if isinstance(out, (tuple, list)) else out
    return h.float().pow(2).mean()


class TokenMask:
    """The real-token mask [batch, seq] of the batch now running (None: every token is real)."""

    def __init__(self):
        self.current = None

    def set(self, attention_mask):
        m = attention_mask
        self.current = m.bool() if isinstance(m, torch.Tensor) and m.dim() == 2 else None

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of ``x`` [..., K] that belong to real tokens, as [n, K]."""
        m = self.current
        if m is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape):
            return x[m.to(x.device)]
        return x.reshape(-1, x.shape[-1])

    @contextmanager
    def follow(self, model: nn.Module):
        """Read ``attention_mask`` from every call of ``model`` (for ``calib.run`` passes)."""
        def pre_hook(_module, args, kwargs):
            self.set(kwargs.get("attention_mask"))

        handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()
            self.current = None


__all__ = ["batches", "run", "default_loss", "device_of", "to_device", "TokenMask"]
