"""Block-by-block replay of calibration data through a transformer (SparseGPT's schedule).

The inputs of block 0 are captured once per calibration batch (a forward pre-hook records the
positional and keyword arguments the block receives - hidden states, attention mask, position
embeddings - and raises ``_Stop`` to end the forward there). Then, per block: hook its selected
linear layers, run the block on the cached inputs to accumulate their statistics, let the
caller prune them, and run the block again to turn the cached inputs into the next block's
inputs. Later layers thus see the outputs of already-pruned layers, and only one block's
activations are live at a time. Selected layers outside the blocks (a BERT pooler, an included
lm_head) are handled last, from one pass of the pruned model.
"""
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import calib as _calib
from .layer_inputs import TokenMask, collect


class _Stop(Exception):
    """Raised by the capture hook to end a forward at block 0."""


def find_blocks(model: nn.Module, path: str | None = None, who: str = "pysparse.prune"):
    """(qualified name, nn.ModuleList) of the model's transformer blocks.

    ``path`` names the list (e.g. ``"encoder.layer"``); otherwise the nn.ModuleList holding the
    most parameters is taken (BERT ``encoder.layer``, GPT-2 ``transformer.h``, Llama
    ``model.layers``).
    """
    if path is not None:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"{who}: the model has no submodule {path!r} (blocks=)") from None
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise ValueError(f"{who}: blocks={path!r} is a {type(blocks).__name__}, not a "
                             f"non-empty nn.ModuleList of transformer blocks")
        return path, blocks
    best, size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            n = sum(p.numel() for p in module.parameters())
            if n > size:
                best, size = (name, module), n
    if best is None:
        raise ValueError(
            f"{who}: found no nn.ModuleList of transformer blocks in {type(model).__name__} "
            f"(the layer-sequential methods prune block by block); name the list with "
            f"blocks='<path>' or use another method")
    return best


def _no_cache(value):
    """Replace a transformers Cache object by None: replays must not append to a KV cache."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is a dependency
        return value
    return None if isinstance(value, Cache) else value


def _hidden(output):
    """The hidden states a block returns (a tensor, or the first item of a tuple/ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    return output[0]


def capture_inputs(model: nn.Module, block: nn.Module, data: list) -> list:
    """Per calibration batch: [args, kwargs, attention_mask] of the call to ``block``."""
    cached = []

    def pre_hook(_module, args, kwargs):
        cached.append([[_no_cache(a) for a in args],
                       {k: _no_cache(v) for k, v in kwargs.items()}, None])
        raise _Stop

    dev = _calib.device_of(model)
    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for batch in data:
            batch = _calib.to_device(batch, dev)
            try:
                model(**batch)
            except _Stop:
                pass
            else:
                raise RuntimeError(f"pysparse.prune: the forward of {type(model).__name__} "
                                   f"did not reach its first transformer block")
            cached[-1][2] = batch.get("attention_mask")
    finally:
        handle.remove()
    return cached


def _with_hidden(args, kwargs, hidden):
    if args:
        return [hidden, *args[1:]], kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    raise RuntimeError("pysparse.prune: cannot tell which argument of the transformer block "
                       "holds the hidden states (no positional argument, no hidden_states=)")


@torch.no_grad()
def replay(model: nn.Module, data: list, layers: dict, process: Callable, *,
           gram: bool, blocks: str | None = None, progress: bool = True,
           desc: str = "pruning") -> None:
    """Run ``process(layers_of_step, stats)`` on every selected layer, block by block.

    layers: name -> module (the selected linear layers). stats: name -> InputStats of the
    layer's inputs over the real calibration tokens, computed with every earlier block already
    processed. ``process`` changes the layers in place.
    """
    _, block_list = find_blocks(model, blocks)
    was_training = model.training
    model.eval()
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache is not None:
        config.use_cache = False
    tokens = TokenMask()
    try:
        cached = capture_inputs(model, block_list[0], data)
        done = set()
        last = len(block_list) - 1
        for i, block in enumerate(tqdm(block_list, desc=desc, disable=not progress,
                                       leave=False)):
            inside = {id(m) for m in block.modules()}
            own = {n: m for n, m in layers.items() if id(m) in inside}
            if own:
                with collect(own, tokens, gram) as stats:
                    for args, kwargs, mask in cached:
                        tokens.set(mask)
                        block(*args, **kwargs)
                process(own, stats)
                done.update(own)
            if i < last:
                for entry in cached:
                    args, kwargs, _ = entry
                    entry[0], entry[1] = _with_hidden(args, kwargs,
                                                      _hidden(block(*args, **kwargs)))
        del cached
        rest = {n: m for n, m in layers.items() if n not in done}
        if rest:
            with collect(rest, tokens, gram) as stats, tokens.follow(model):
                _calib.run(model, data, desc=f"{desc} (layers outside the blocks)",
                           progress=progress)
            process(rest, stats)
    finally:
        if use_cache is not None:
            config.use_cache = use_cache
        model.train(was_training)


__all__ = ["find_blocks", "capture_inputs", "replay"]
