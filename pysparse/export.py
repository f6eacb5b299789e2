"""Export a model after ``replace_linear``: a compressed-tensors checkpoint and an ONNX graph.

* ``export_compressed_tensors(model, out_dir)`` writes ``model.safetensors`` + ``config.json`` in
  the compressed-tensors layout (``quant_method: "compressed-tensors"``), the format vLLM and
  transformers' compressed-tensors integration load. Schemes:

  ======================  ==================================================================
  "w8a8" (dynamic)        ``int-quantized``: ``weight`` int8, ``weight_scale`` [N, 1] fp32
                          (channel), activations int8 per token, dynamic
  "w8a8" static           ``int-quantized``: as above + ``input_scale`` [1] fp32 (tensor,
                          static) and, when asymmetric, ``input_zero_point`` [1] int8
                          (= pysparse's uint8 zero point - 128, the same codes shifted)
  "2:4+w8a8"              as "w8a8" with the int8 weight dense (pruned zeros kept) and a
                          ``sparsity_config`` block (format "dense", structure "2:4")
  "w8"                    ``pack-quantized``: ``weight_packed`` int32 [N, ceil(K/4)],
                          ``weight_shape``, ``weight_scale`` [N, 1]; no activation quant
  "w4"                    ``pack-quantized``, strategy "group": ``weight_packed`` int32
                          [N, ceil(K/8)], ``weight_scale`` [N, K/G], and for asymmetric
                          groups ``weight_zero_point`` int32 (packed along N)
  "2:4" (float)           the dense float ``weight`` (listed in ``ignore``, not quantized),
                          named in ``sparsity_config``
  ======================  ==================================================================

  A layer carrying a pending smoothing vector (``input_multiplier``: SmoothQuant / AWQ on a
  layer that could not be folded) raises ValueError: the format has no per-input-channel
  multiplier, and folding it into the weight would change the int8 codes.
  Scales and biases are written fp32, other tensors in their dtype; ``compressed_tensors``
  itself is not needed to export (only to read the checkpoint back).
* ``export_onnx(model, path, example_inputs)`` writes an ONNX graph (torch.onnx dynamo
  exporter) where the int8 weights stay int8 initializers feeding ``DequantizeLinear``
  (per-axis scale) -> ``MatMul`` (QDQ). Schemes: "w8a8" dynamic and "2:4+w8a8" (per-token
  activation quantization as the exact float subgraph ``ReduceMax(|x|) / 127, Div, Round,
  Clip, Mul``), "w8a8" static (``QuantizeLinear -> DequantizeLinear`` with the calibrated scale
  / zero point), "w8" (weight DQ only); a pending ``input_multiplier`` is a Mul. "w4" and float
  "2:4" have no int8 QDQ form here: by default (``unsupported="dequantize"``) they are written
  as float weights with a warning (exact, but neither smaller nor sparse);
  ``unsupported="error"`` raises instead.
"""
import json
import os
import warnings

import torch
from torch import nn

from .formats import int8 as _int8
from .formats import sparse24 as _sp24
from .nn.linear import (Int4Linear, Int8Linear, Int8WeightOnlyLinear, Sparse24Int8Linear,
                        Sparse24Linear, StaticInt8Linear, _PackedLinear)
from .replace import is_linear

_CT = "pysparse.export_compressed_tensors"
_ONNX = "pysparse.export_onnx"

# the schemes each export writes (Sparse24Linear: dense float weights, see the module doc)
CT_SUPPORTED = ("w8a8", "w8a8-static", "2:4+w8a8", "w8", "w4", "2:4")
ONNX_SUPPORTED = ("w8a8", "w8a8-static", "2:4+w8a8", "w8")
ONNX_DEQUANTIZED = ("w4", "2:4")
_CLASSES = (Int8Linear, StaticInt8Linear, Sparse24Int8Linear, Int8WeightOnlyLinear, Int4Linear,
            Sparse24Linear)


# ----------------------------------------------------------------------------- shared checks
def _packed_layers(model, who):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: expected a torch.nn.Module, got {type(model).__name__}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _PackedLinear)]
    if not layers:
        raise ValueError(f"{who}: the model has no pysparse layer (nothing replaced); call "
                         f"pysparse.replace_linear(model, scheme=...) first")
    return layers


def _check_known(name, module, supported, who):
    if type(module) not in _CLASSES:
        raise ValueError(f"{who}: layer {name!r} is a {type(module).__name__} (scheme "
                         f"{getattr(module, 'scheme', '?')!r}), which this export does not "
                         f"support; supported schemes: {', '.join(supported)}")


def _int8_dense(module):
    """The int8 weight [N, K] (canonical, pruned zeros kept for 2:4) of a W8A8 / w8 module."""
    if isinstance(module, Sparse24Int8Linear):
        return _sp24.decompress(*module.canonical())
    return module.int8_weight() if hasattr(module, "int8_weight") else module.weight_q


# ----------------------------------------------------------------------------- compressed-tensors
def _pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [R, C] (values < 2**bits, bits 4 or 8) -> int32 [R, ceil(C * bits / 32)],
    element c at bit ``(c * bits) % 32`` of word ``c * bits // 32`` (compressed-tensors'
    ``pack_to_int32`` layout; padding elements are 0)."""
    per = 32 // bits
    R, C = codes.shape
    pad = -C % per
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)).reshape(R, -1, per)
    shifts = torch.arange(per, dtype=torch.int64, device=codes.device) * bits
    words = (c << shifts).sum(-1)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)  # two's complement
    return words.to(torch.int32).contiguous()


def _args(num_bits, strategy, *, symmetric=True, dynamic=False, group_size=None):
    return {"num_bits": num_bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
            "group_size": group_size, "dynamic": dynamic, "actorder": None,
            "block_structure": None, "observer": None if dynamic else "minmax",
            "observer_kwargs": {}}


_W8_CHANNEL = _args(8, "channel")


def _ct_layer(name, module, conv1d):
    """(group key, scheme dict or None for a float layer, {tensor name: tensor})."""
    N = module.out_features
    out = {}
    if isinstance(module, (Int8Linear, Sparse24Int8Linear, StaticInt8Linear)):
        q = _int8_dense(module)
        out["weight"] = q.t() if conv1d else q
        out["weight_scale"] = module.weight_scale.float().reshape(N, 1)
        if isinstance(module, StaticInt8Linear):
            sym = module.input_zero is None
            out["input_scale"] = module.input_scale.float().reshape(1)
            if not sym:  # uint8 code u with zero z == int8 code u - 128 with zero z - 128
                out["input_zero_point"] = (module.input_zero.to(torch.int32).reshape(1)
                                           - 128).to(torch.int8)
            key = ("w8a8-static", sym)
            scheme = {"weights": _W8_CHANNEL,
                      "input_activations": _args(8, "tensor", symmetric=sym),
                      "format": "int-quantized"}
        else:
            key = ("w8a8",)
            scheme = {"weights": _W8_CHANNEL,
                      "input_activations": _args(8, "token", dynamic=True),
                      "format": "int-quantized"}
    elif isinstance(module, Int8WeightOnlyLinear):
        q = module.weight_q
        out["weight_packed"] = _pack_int32((q.to(torch.int16) + 128).to(torch.uint8), 8)
        out["weight_shape"] = torch.tensor(list(q.shape), dtype=torch.int64)
        out["weight_scale"] = module.weight_scale.float().reshape(N, 1)
        key = ("w8",)
        scheme = {"weights": _W8_CHANNEL, "input_activations": None, "format": "pack-quantized"}
    elif isinstance(module, Int4Linear):
        from .quant import int4 as _int4
        # pysparse's nibbles (q + 8 symmetric, q asymmetric) are compressed-tensors' int4 codes
        # (c in [-8, 7]) + 8: the same bits, with zero points shifted by 8 alike
        nibbles = _int4.unpack(module.weight_packed)
        out["weight_packed"] = _pack_int32(nibbles, 4)
        out["weight_shape"] = torch.tensor([N, module.in_features], dtype=torch.int64)
        out["weight_scale"] = module.weight_scale.float().contiguous()
        if not module.symmetric:
            out["weight_zero_point"] = _pack_int32(module.weight_zero.t(), 4).t().contiguous()
        key = ("w4", module.group_size, module.symmetric)
        scheme = {"weights": _args(4, "group", symmetric=module.symmetric,
                                   group_size=module.group_size),
                  "input_activations": None, "format": "pack-quantized"}
    else:  # Sparse24Linear: float, not quantized
        w = module.dequantized_weight()
        out["weight"] = w.t() if conv1d else w
        key, scheme = None, None
    if module.bias is not None:
        out["bias"] = module.bias
    return key, scheme, out


def _conv1d_names(model):
    """Qualified names of the transformers Conv1D layers of a fresh copy of the model's class
    (replaced layers no longer say what they were): their ``weight`` is stored [in, out]."""
    names = {n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    config = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "config_class"):
        return names
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = type(model)(config)
    except Exception:  # not constructible from its config: keep what the model shows
        return names
    return names | {n for n, m in fresh.named_modules() if type(m).__name__ == "Conv1D"}


def _model_config(model):
    config = getattr(model, "config", None)
    if config is None:
        return {}
    if hasattr(config, "to_json_string"):
        return json.loads(config.to_json_string(use_diff=False))
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return {}


def export_compressed_tensors(model: nn.Module, out_dir, *, tokenizer=None) -> dict:
    """Write ``model`` (after ``replace_linear``) as a compressed-tensors checkpoint in
    ``out_dir``: ``model.safetensors`` and ``config.json`` (the model's config plus a
    ``quantization_config`` block), and the tokenizer when given (``save_pretrained``).
    Returns the ``quantization_config`` block.

    Every tensor keeps its name in ``model.state_dict()``; each replaced layer ``<name>`` is
    written in the compressed-tensors names and layout of its scheme (table in the module doc),
    other tensors as they are. ``weight`` tensors of transformers Conv1D layers (GPT-2) keep
    Conv1D's [in, out] layout, as the original checkpoint had them (vLLM's GPT-2 loader
    transposes them back); packed tensors and scales are always per output channel [N, ...].
    Quantized layers go into one config group per scheme (targets ``["Linear"]`` when there is
    one group, the layer names otherwise); linear layers left float are listed in ``ignore``.
    Tied tensors are written once (the first name). Tensors on any device are copied to the CPU.

    Raises TypeError for a non-module, ValueError when nothing is replaced, for a layer of an
    unsupported scheme, and for a layer with a pending smoothing multiplier
    (``input_multiplier``), which compressed-tensors cannot represent.
    """
    layers = _packed_layers(model, _CT)
    for name, module in layers:
        _check_known(name, module, CT_SUPPORTED, _CT)
        if getattr(module, "input_multiplier", None) is not None:
            raise ValueError(
                f"{_CT}: layer {name!r} carries a smoothing multiplier (SmoothQuant / AWQ "
                f"input_multiplier, applied to its input before quantizing), which the "
                f"compressed-tensors format cannot represent (no per-input-channel multiplier; "
                f"folding it into the int8 weight would change its codes). Smooth only where "
                f"the vector folds into the preceding norm / linear (pre-LN models), or replace "
                f"the layer without smoothing")
    from safetensors.torch import save_file

    conv1d = _conv1d_names(model)
    packed_names = {name for name, _ in layers}
    tensors, groups, sparse24, floats = {}, {}, [], []
    for name, module in layers:
        key, scheme, out = _ct_layer(name, module, name in conv1d)
        for k, t in out.items():
            tensors[f"{name}.{k}"] = t
        if isinstance(module, (Sparse24Linear, Sparse24Int8Linear)):
            sparse24.append(name)
        if key is None:
            floats.append(name)
        else:
            groups.setdefault(key, (scheme, []))[1].append(name)
    floats += [n for n, m in model.named_modules() if n and is_linear(m)]
    seen = {}
    for key, t in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in packed_names:
            continue
        if t.numel() and t.device.type != "meta":
            ptr = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape)
            if ptr in seen:  # tied (e.g. lm_head.weight = embed_tokens.weight): written once
                continue
            seen[ptr] = key
        tensors[key] = t
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    formats = sorted({s["format"] for s, _ in groups.values()})
    single = len(groups) == 1
    config_groups = {}
    for i, (scheme, names) in enumerate(groups.values()):
        config_groups[f"group_{i}"] = {"targets": ["Linear"] if single else sorted(names),
                                       "output_activations": None, **scheme}
    qcfg = {"quant_method": "compressed-tensors",
            "format": formats[0] if len(formats) == 1 else
            ("mixed-precision" if formats else "dense"),
            "quantization_status": "compressed",
            "config_groups": config_groups,
            "ignore": sorted(floats),
            "kv_cache_scheme": None,
            "global_compression_ratio": None}
    if sparse24:
        zeros = total = 0
        for name, module in layers:
            if name in sparse24:
                zeros += int((module.dequantized_weight() == 0).sum())
            total += module.in_features * module.out_features
        qcfg["sparsity_config"] = {"format": "dense", "sparsity_structure": "2:4",
                                   "targets": sorted(sparse24), "ignore": [],
                                   "global_sparsity": zeros / total}
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config = _model_config(model)
    config["quantization_config"] = qcfg
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return qcfg


# ----------------------------------------------------------------------------- ONNX
# Custom ops the export-only modules call: opaque to torch.export, translated to ONNX below.
@torch.library.custom_op("pysparse_export::dequantize_linear", mutates_args=())
def _dequantize_linear(q: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """q int8 * scale along ``axis`` (1-D) -> fp32 (ONNX DequantizeLinear, per-axis)."""
    shape = [1] * q.dim()
    shape[axis] = -1
    return q.float() * scale.float().reshape(shape)


@_dequantize_linear.register_fake
def _(q, scale, axis):
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


@torch.library.custom_op("pysparse_export::quantize_dequantize_static", mutates_args=())
def _qdq_static(x: torch.Tensor, scale: float, zero: int) -> torch.Tensor:
    """fp32 x -> ONNX QuantizeLinear -> DequantizeLinear, per tensor. zero < 0: int8 codes,
    zero point 0 (saturating at [-128, 127]); else uint8 codes with that zero point."""
    xf = x.float()
    if zero < 0:
        q = torch.round(xf / scale).clamp(-128, 127)
        return q * scale
    q = (torch.round(xf / scale) + zero).clamp(0, 255)
    return (q - zero) * scale


@_qdq_static.register_fake
def _(x, scale, zero):
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


def _onnx_translations():
    import onnx_ir as ir
    from onnxscript import opset18 as op

    def dequantize_linear(q, scale, axis: int):
        return op.DequantizeLinear(q, scale, axis=axis)

    def qdq_static(x, scale: float, zero: int):
        s = op.Constant(value=ir.tensor(float(scale), dtype=ir.DataType.FLOAT))
        if zero < 0:
            z = op.Constant(value=ir.tensor(0, dtype=ir.DataType.INT8))
        else:
            z = op.Constant(value=ir.tensor(int(zero), dtype=ir.DataType.UINT8))
        return op.DequantizeLinear(op.QuantizeLinear(x, s, z), s, z)

    return {torch.ops.pysparse_export.dequantize_linear.default: dequantize_linear,
            torch.ops.pysparse_export.quantize_dequantize_static.default: qdq_static}


def _per_token_qdq(x):
    """pysparse's per-token int8 quantization, dequantized, in plain ops that export to ONNX
    (ReduceMax(|x|), Max, Div, Round (half to even in both), Clip, Mul): the same codes and
    scales as ``reference.quantize_per_token``."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(_int8.EPS) / _int8.QMAX
    return torch.round(x / scale).clamp(-_int8.QMAX, _int8.QMAX) * scale


class _OnnxLinear(nn.Module):
    """Export-only stand-in for a packed layer: int8 weight [K, N] (transposed once, exactly, so
    DequantizeLinear feeds MatMul directly, scale per axis 1), activation (de)quantization, bias;
    float fallback for schemes without an int8 QDQ form."""

    def __init__(self, module, act, float_weight=False):
        super().__init__()
        self.act = act  # "token" | "static" | None
        if float_weight:
            self.register_buffer("weight_t", module.dequantized_weight().float().t().contiguous())
            self.register_buffer("weight_scale", None)
        else:
            self.register_buffer("weight_t", _int8_dense(module).t().contiguous())
            self.register_buffer("weight_scale", module.weight_scale.float().contiguous())
        self.register_buffer("bias", None if module.bias is None else module.bias.float())
        m = getattr(module, "input_multiplier", None)
        self.register_buffer("input_multiplier", None if m is None else m.float())
        if act == "static":
            self.input_scale = float(module.input_scale)
            self.input_zero = -1 if module.input_zero is None else int(module.input_zero)

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        if self.input_multiplier is not None:
            x = x * self.input_multiplier
        if self.act == "token":
            x = _per_token_qdq(x)
        elif self.act == "static":
            x = torch.ops.pysparse_export.quantize_dequantize_static(x, self.input_scale,
                                                                     self.input_zero)
        w = self.weight_t if self.weight_scale is None else \
            torch.ops.pysparse_export.dequantize_linear(self.weight_t, self.weight_scale, 1)
        y = torch.matmul(x, w)
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype)


def _onnx_stand_in(name, module, unsupported):
    if isinstance(module, (Int8Linear, Sparse24Int8Linear)):
        return _OnnxLinear(module, "token")
    if isinstance(module, StaticInt8Linear):
        return _OnnxLinear(module, "static")
    if isinstance(module, Int8WeightOnlyLinear):
        return _OnnxLinear(module, None)
    if isinstance(module, (Int4Linear, Sparse24Linear)):
        if unsupported == "error":
            raise ValueError(f"{_ONNX}: layer {name!r} has scheme {module.scheme!r}, which has no "
                             f"int8 QDQ form; supported: {', '.join(ONNX_SUPPORTED)} (pass "
                             f"unsupported='dequantize' to write it as a float weight)")
        warnings.warn(f"{_ONNX}: layer {name!r} (scheme {module.scheme!r}) is written with its "
                      f"dequantized float weight (exact, but neither smaller nor sparse)")
        return _OnnxLinear(module, None, float_weight=True)
    _check_known(name, module, ONNX_SUPPORTED, _ONNX)


class _Wrapper(nn.Module):
    """The model called with its inputs given positionally (keyword inputs by name when
    ``names`` is set); returns its main output tensor."""

    def __init__(self, model, names, extra):
        super().__init__()
        self.model, self.names, self.extra = model, names, dict(extra)

    def forward(self, *args):
        if self.names is None:
            return _main_output(self.model(*args, **self.extra))
        return _main_output(self.model(**dict(zip(self.names, args)), **self.extra))


def _main_output(out):
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        v = getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(f"{_ONNX}: cannot find the model's output tensor in a "
                     f"{type(out).__name__} (expected a tensor, .logits or .last_hidden_state)")


def _example(example_inputs, tokenizer):
    """(positional args tuple, keyword names or None)."""
    if example_inputs is None:
        if tokenizer is None:
            raise ValueError(f"{_ONNX}: give example_inputs (a dict of input tensors, a tensor "
                             f"or a tuple of tensors) or a tokenizer to build them")
        enc = tokenizer(["pysparse exports this model", "to onnx"], return_tensors="pt",
                        padding=True)
        example_inputs = {k: v for k, v in enc.items()}
    if hasattr(example_inputs, "keys") and not isinstance(example_inputs, dict):
        example_inputs = dict(example_inputs)  # BatchEncoding
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):
        names, values = list(example_inputs), tuple(example_inputs.values())
    elif isinstance(example_inputs, (tuple, list)):
        names, values = None, tuple(example_inputs)
    else:
        names, values = None, ()
    if not values or not all(isinstance(v, torch.Tensor) for v in values):
        raise TypeError(f"{_ONNX}: example_inputs must be a tensor, a tuple of tensors or a "
                        f"non-empty dict of name -> tensor, got {type(example_inputs).__name__}")
    return values, names


def export_onnx(model: nn.Module, path, example_inputs=None, *, tokenizer=None,
                input_names=None, output_name: str | None = None, dynamic: bool = True,
                opset_version: int = 18, unsupported: str = "dequantize"):
    """Export ``model`` (after ``replace_linear``) to an ONNX file at ``path``; returns ``path``.

    example_inputs: a dict of keyword inputs (e.g. a tokenizer's output; the graph inputs keep
    those names, in that order), a tensor or a tuple of tensors (positional; named
    ``input_names`` or input_0, input_1, ...); or give ``tokenizer`` to tokenize two short
    sentences. With ``dynamic``, dim 0 ("batch") and dim 1 ("sequence") of every input are
    dynamic. The one output is the model's tensor, ``.logits`` or ``.last_hidden_state``
    (named ``output_name``, default that attribute's name or "output"); ``use_cache=False`` is
    passed to models whose config has ``use_cache``.

    Each replaced layer is swapped, for the export only, for a module of plain ops: the int8
    weight as an int8 initializer [K, N] (transposed once, exactly) -> DequantizeLinear (fp32
    scale per output channel, axis 1) -> MatMul (+ bias), the QDQ form ONNX Runtime fuses into
    its int8-weight MatMul. Activations:

    * W8A8 dynamic / "2:4+w8a8" (int8 weight dense, pruned zeros kept): pysparse's per-token
      quantization as the float subgraph ReduceMax(|x|), Max(., 1e-12) / 127, Div, Round
      (half to even), Clip(-127, 127), Mul: the same codes and scales as
      ``reference.quantize_per_token``, so the graph computes what pysparse computes up to fp32
      accumulation order (DynamicQuantizeLinear is per-tensor uint8: not the same numerics).
    * W8A8 static: QuantizeLinear -> DequantizeLinear with the calibrated scale; int8 with zero
      point 0 when symmetric (ONNX saturates at -128 where pysparse clamps at -127: inputs
      below -127.5 * scale, outside the calibrated range, differ by one code), uint8 with the
      calibrated zero point when asymmetric (identical).
    * "w8": weight DequantizeLinear only (float activations).
    * a pending smoothing multiplier (``input_multiplier``) is a Mul before the quantization.

    ``unsupported``: "dequantize" (default) writes "w4" and float "2:4" layers as float weights
    [K, N] with a warning (exact, but neither 4-bit nor sparse in the file); "error" raises.
    Note: ONNX Runtime's default graph optimizations fuse DequantizeLinear + MatMul into
    ``MatMulNBits``, whose default ``accuracy_level`` 4 re-quantizes the activations per block
    (about 0.5 % of max |output| on small models); the session option
    ``session.qdq_matmulnbits_accuracy_level = "1"`` keeps fp32 arithmetic.
    Uses ``torch.onnx.export(dynamo=True)`` (needs ``onnx`` and ``onnxscript``). The original
    modules are put back afterwards, also when the export fails.
    """
    if unsupported not in ("dequantize", "error"):
        raise ValueError(f"{_ONNX}: unsupported must be 'dequantize' or 'error', got "
                         f"{unsupported!r}")
    layers = _packed_layers(model, _ONNX)
    values, names = _example(example_inputs, tokenizer)
    stand_ins = [(name, _onnx_stand_in(name, m, unsupported)) for name, m in layers]
    try:
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{_ONNX}: needs the onnx and onnxscript packages "
                          f"(pip install onnx onnxscript)") from exc
    if names is not None:
        graph_names = names
    elif input_names is not None:
        graph_names = list(input_names)
        if len(graph_names) != len(values):
            raise ValueError(f"{_ONNX}: {len(graph_names)} input_names for {len(values)} "
                             f"example inputs")
    else:
        graph_names = [f"input_{i}" for i in range(len(values))]
    extra = {}
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "use_cache"):
        extra["use_cache"] = False
    dyn = None
    if dynamic:
        B, S = torch.export.Dim("batch"), torch.export.Dim("sequence")
        dyn = ({0: B, 1: S} if v.dim() >= 2 else ({0: B} if v.dim() == 1 else None)
               for v in values)
        dyn = (tuple(dyn),)  # one entry: forward(*args)
    originals = []
    was_training = model.training
    try:
        for name, new in stand_ins:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            originals.append((parent, attr, getattr(parent, attr)))
            setattr(parent, attr, new)
        model.eval()
        wrapper = _Wrapper(model, names, extra)
        if output_name is None:
            with torch.no_grad():
                out = model(*values, **extra) if names is None else \
                    model(**dict(zip(names, values)), **extra)
            output_name = next((k for k in ("logits", "last_hidden_state")
                                if isinstance(getattr(out, k, None), torch.Tensor)), "output")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper, values, dynamo=True, input_names=graph_names,
                output_names=[output_name], dynamic_shapes=dyn, opset_version=opset_version,
                custom_translation_table=_onnx_translations(), verbose=False,
                external_data=False)
        program.save(str(path), external_data=False)
    finally:
        for parent, attr, old in reversed(originals):
            setattr(parent, attr, old)
        model.train(was_training)
    return path


__all__ = ["export_compressed_tensors", "export_onnx", "CT_SUPPORTED", "ONNX_SUPPORTED"]
