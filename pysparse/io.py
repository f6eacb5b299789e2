"""Save and load compressed models: safetensors + a JSON manifest, no pickle, no fp32 weights.

``pysparse.save(model, directory)`` writes

* ``model.safetensors``: every parameter and buffer of the model, shared tensors once. Packed
  layers (``replace_linear``) are stored in their *canonical* compressed format (int8 codes
  [N, K] + scales, 2:4 kept values [N, K/2] + metadata, int4 codes two per byte + group
  scales), not in the machine-specific kernel layout (vnni16 / sp24), so a directory saved on
  one CPU loads on another and is re-packed for the kernels found there;
* ``pysparse.json``: the manifest (format version, pysparse / torch / transformers versions,
  the transformers model class and config, every packed layer with its scheme and constructor
  arguments, tensor names / dtypes / shapes, modules shared between several names, tensors
  tied under several names, and the SHA-256 and size of the safetensors file);
* the tokenizer files when ``tokenizer=`` is given.

``pysparse.load(directory)`` checks the manifest against the file (size, checksum, names, dtypes,
shapes) before building anything, builds the transformers model from its config on the meta
device (no fp32 weights are allocated or read), puts the packed modules in place and fills every
tensor from the file. A model that loads is bit-exact with the one saved (same tensors, same
outputs); anything else raises ``pysparse.io.FormatError`` (a ValueError) with the reason, and
nothing is returned half-loaded.

Supported: transformers ``PreTrainedModel`` classes exported at the top level of
``transformers`` (loading never imports anything else), including head-pruned models
(``<Class>WithPrunedHeads``, see prune.structured), models switched to pysparse attention, and
models whose layers share modules (cross-layer weight sharing) or tensors (tied embeddings).
"""
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from .formats import int8 as _int8
from .formats import sparse24 as _sp24
from .nn import linear as _lin

FORMAT = "pysparse"
FORMAT_VERSION = 1
MANIFEST = "pysparse.json"
WEIGHTS = "model.safetensors"

# the packed classes a manifest may name, and the buffers each stores in canonical form
_CLASSES = {c.__name__: c for c in (_lin.Int8Linear, _lin.StaticInt8Linear,
                                      _lin.Int8WeightOnlyLinear, _lin.Int4Linear,
                                      _lin.Sparse24Linear, _lin.Sparse24Int8Linear)}
_DTYPES = {str(d).replace("torch.", ""): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8,
    torch.int16, torch.int32, torch.int64, torch.bool)}


class FormatError(ValueError):
    """A pysparse directory that cannot be loaded: missing, corrupted, truncated, another format
    version, or a manifest that does not match its tensors."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# packed modules <-> canonical tensors


def _packed_spec(m) -> tuple[dict, dict]:
    """(constructor spec, canonical tensors) of a packed module."""
    spec = {"class": type(m).__name__, "scheme": m.scheme, "in_features": m.in_features,
            "out_features": m.out_features, "bias": m.bias is not None, "backend": m.backend}
    if isinstance(m, _lin.Int8Linear):
        t = {"weight_q": m.int8_weight(), "weight_scale": m.weight_scale}
    elif isinstance(m, _lin.Sparse24Linear):
        values, meta = m.canonical()
        t = {"values": values, "meta": meta}
        spec["dtype"] = str(values.dtype).replace("torch.", "")
    elif isinstance(m, _lin.Sparse24Int8Linear):
        values_q, meta = m.canonical()
        t = {"values_q": values_q, "meta": meta, "weight_scale": m.weight_scale}
    else:  # StaticInt8Linear, Int8WeightOnlyLinear, Int4Linear hold canonical buffers already
        t = {n: b for n, b in m.named_buffers(recurse=False)}
        if isinstance(m, _lin.Int4Linear):
            spec["group_size"], spec["symmetric"] = m.group_size, m.symmetric
    for name in ("bias", "input_multiplier", "input_zero"):
        b = getattr(m, name, None)
        if b is not None:
            t[name] = b
    return spec, {k: v.detach() for k, v in t.items() if v is not None}


def _build_packed(spec: dict, t: dict, where: str):
    """The packed module of ``spec`` from its canonical tensors, in the layout the kernels of
    this machine take (what ``from_linear`` would have made)."""
    try:
        return _build_packed_unchecked(spec, t, where)
    except KeyError as exc:
        raise FormatError(f"pysparse.load: packed layer {where!r} ({spec.get('class')}) lacks "
                          f"its tensor or field {exc} in the file / manifest") from None


def _build_packed_unchecked(spec, t, where):
    cls = _CLASSES[spec["class"]]
    K, N, backend = spec["in_features"], spec["out_features"], spec["backend"]
    if cls is _lin.Int8Linear:
        layout = _lin.default_layout(backend, "cpu")
        m = cls(K, N, bias=False, backend=backend, layout=layout)
        if layout == "vnni16":
            m.weight_packed, m.weight_colsum = _int8.pack_vnni16(t["weight_q"])
        else:
            m.weight_q = t["weight_q"]
        m.weight_scale = t["weight_scale"]
    elif cls is _lin.Sparse24Linear:
        values, meta = t["values"], t["meta"]
        layout = _lin.default_sparse_layout(backend, "cpu", values.dtype)
        m = cls(K, N, bias=False, dtype=values.dtype, backend=backend, layout=layout)
        if layout == "sp24":
            m.weight_values, m.weight_codes = _sp24.pack_cpu_float(values, meta)
        else:
            m.values, m.meta = values, meta
    elif cls is _lin.Sparse24Int8Linear:
        layout = _lin.default_sparse_layout(backend, "cpu", torch.int8)
        m = cls(K, N, bias=False, backend=backend, layout=layout)
        if layout == "sp24":
            m.weight_values, m.weight_codes, m.weight_colsum = _sp24.pack_cpu_int8(
                t["values_q"], t["meta"])
        else:
            m.values_q, m.meta = t["values_q"], t["meta"]
        m.weight_scale = t["weight_scale"]
    else:
        kw = {}
        if cls is _lin.Int4Linear:
            kw = dict(group_size=spec["group_size"], symmetric=spec["symmetric"])
        m = cls(K, N, bias=False, backend=backend, **kw)
        for name in list(m._buffers):
            if name not in ("bias", "input_multiplier", "input_zero"):
                m._buffers[name] = t[name]
    for name in ("bias", "input_multiplier", "input_zero"):
        if name in t:
            m._buffers[name] = t[name]
    expected = set(_packed_spec(m)[1])
    if expected != set(t):
        raise FormatError(f"pysparse.load: packed layer {where!r} ({spec['class']}) has tensors "
                          f"{sorted(t)} in the file but needs {sorted(expected)}")
    return m


# ---------------------------------------------------------------------------------------------
# save


def _model_class(model):
    from .prune import structured
    cls = type(model)
    pruned = cls.__name__.endswith(structured.SUFFIX) and isinstance(
        model, structured._PrunedHeadsModel)
    base = cls.__mro__[2] if pruned else cls  # (<Mixin>, <Base>) after the class itself
    import transformers
    if getattr(transformers, base.__name__, None) is not base:
        raise TypeError(f"pysparse.save: {base.__module__}.{base.__name__} is not a model class "
                        f"exported by transformers; pysparse.load rebuilds only those (it never "
                        f"imports other code)")
    return base.__name__, pruned


def save(model: nn.Module, directory, *, tokenizer=None, overwrite: bool = False,
         extra: dict | None = None) -> Path:
    """Write ``model`` (a transformers PreTrainedModel, replaced / pruned / calibrated or not) to
    ``directory``: ``model.safetensors`` + ``pysparse.json`` (+ tokenizer files). Packed layers
    are stored compressed in their canonical format; shared modules and tied tensors once.
    Refuses a non-empty directory that holds no pysparse save unless ``overwrite=True``.
    extra: JSON-serializable facts stored in the manifest under "extra" (``pysparse compress``
    records the source model and the recipe there; ``read_manifest(dir)["extra"]`` reads them).
    Returns the directory. ``pysparse.load(directory)`` rebuilds it."""
    from safetensors.torch import save_file
    from transformers import PreTrainedModel

    from . import __version__
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"pysparse.save: expected a transformers PreTrainedModel (load rebuilds "
                        f"the model from its config), got {type(model).__name__}")
    class_name, pruned = _model_class(model)
    for name, m in model.named_modules():
        if (type(m).__module__.startswith("pysparse.")
                and not isinstance(m, (_lin._PackedLinear, PreTrainedModel))):
            raise TypeError(f"pysparse.save: module {name!r} is a {type(m).__name__}, which "
                            f"pysparse cannot save; finish the pass first (e.g. "
                            f"pysparse.convert_qat(model) after QAT)")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"pysparse.save: {directory} exists and is not a directory")
    if (directory.is_dir() and any(directory.iterdir()) and not overwrite
            and not (directory / MANIFEST).exists()):
        raise ValueError(f"pysparse.save: {directory} is not empty and holds no pysparse save; "
                         f"pass overwrite=True to write into it anyway")

    # modules reachable under several names (cross-layer sharing): store under the first
    first_path, shared_modules = {}, {}
    for name, m in model.named_modules(remove_duplicate=False):
        if id(m) in first_path:
            if name and not any(name.startswith(a + ".") for a in shared_modules):
                shared_modules[name] = first_path[id(m)]
        else:
            first_path[id(m)] = name

    def under_shared(name):
        return any(name == a or name.startswith(a + ".") for a in shared_modules)

    modules, tensors, entries, aliases = {}, {}, {}, {}
    seen = {}  # tensor identity -> stored key
    alive = []  # keeps every tensor seen alive, so a freed temporary's address is never reused

    def put(key, t, kind):
        t = t.detach()
        if t.device.type == "meta":
            raise ValueError(f"pysparse.save: tensor {key!r} is on the meta device (not "
                             f"materialized)")
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                 tuple(t.stride()), t.dtype) if t.numel() else None
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            return
        if ident is not None:
            seen[ident] = key
            alive.append(t)
        stored = t.to("cpu").contiguous()
        if stored.data_ptr() == t.data_ptr() and stored.numel():
            stored = stored.clone()  # safetensors refuses tensors sharing storage: own copies
        tensors[key] = stored
        entries[key] = {"kind": kind, "dtype": str(t.dtype).replace("torch.", ""),
                        "shape": list(t.shape)}

    packed_paths = []
    for name, m in model.named_modules():
        if isinstance(m, _lin._PackedLinear) and not under_shared(name):
            spec, canon = _packed_spec(m)
            modules[name] = spec
            packed_paths.append(name)
            for k, v in canon.items():
                put(f"{name}.{k}", v, "packed")

    def in_packed(key):
        return any(key.startswith(p + ".") for p in packed_paths)

    for kind, named in (("parameter", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        for key, t in named:
            if t is None or in_packed(key) or under_shared(key.rpartition(".")[0]):
                continue
            put(key, t, kind)

    from .nn import attention as _attention
    attn = getattr(model.config, "_attn_implementation", None)
    import transformers
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "pysparse_version": __version__, "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "model": {"class": class_name, "pruned_heads": pruned,
                  "pysparse_attention": attn == _attention.NAME},
        "config": model.config.to_dict(),
        "modules": modules, "shared_modules": shared_modules, "aliases": aliases,
        "tensors": entries, "extra": extra or {},
    }
    try:  # before anything is written
        json.dumps(manifest)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"pysparse.save: extra= and the model config must be JSON-serializable "
                        f"({exc})") from None
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "pysparse_format": str(FORMAT_VERSION)})
    manifest["weights"] = {"file": WEIGHTS, "bytes": tmp.stat().st_size, "sha256": _sha256(tmp)}
    (directory / MANIFEST).unlink(missing_ok=True)  # never a manifest next to other weights
    os.replace(tmp, directory / WEIGHTS)
    text = json.dumps(manifest, indent=1, sort_keys=True)
    (directory / (MANIFEST + ".tmp")).write_text(text)
    os.replace(directory / (MANIFEST + ".tmp"), directory / MANIFEST)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------------------------
# load


def read_manifest(directory) -> dict:
    """The manifest of a pysparse directory, checked for format and version (FormatError)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise FormatError(f"pysparse.load: {directory} is not a directory")
    if not path.exists():
        raise FormatError(f"pysparse.load: {directory} has no {MANIFEST}; it was not written by "
                          f"pysparse.save (or the save did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"pysparse.load: {path} is not valid JSON ({exc}); the file is "
                          f"corrupted or truncated") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FormatError(f"pysparse.load: {path} is not a pysparse manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatError(f"pysparse.load: {path} has format version {version!r}; this pysparse "
                          f"reads version {FORMAT_VERSION} (save it again with a matching "
                          f"pysparse)")
    for key in ("model", "config", "modules", "shared_modules", "aliases", "tensors", "weights"):
        if key not in manifest:
            raise FormatError(f"pysparse.load: {path} lacks the {key!r} entry")
    return manifest


def _check_weights(directory: Path, manifest: dict):
    from safetensors import safe_open
    w = manifest["weights"]
    path = directory / w.get("file", WEIGHTS)
    if not path.exists():
        raise FormatError(f"pysparse.load: {path} is missing")
    size = path.stat().st_size
    if size != w.get("bytes"):
        raise FormatError(f"pysparse.load: {path} has {size} bytes, the manifest says "
                          f"{w.get('bytes')}: the file is truncated or was replaced")
    if _sha256(path) != w.get("sha256"):
        raise FormatError(f"pysparse.load: {path} does not match the SHA-256 in the manifest: "
                          f"the file is corrupted")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = {k: f.get_slice(k) for k in f.keys()}
            found = {k: (s.get_dtype(), list(s.get_shape())) for k, s in header.items()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise FormatError(f"pysparse.load: {path} cannot be read as safetensors ({exc})") from None
    st_names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
                "I8": "int8", "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64",
                "BOOL": "bool"}
    want = manifest["tensors"]
    if set(found) != set(want):
        missing, extra = sorted(set(want) - set(found)), sorted(set(found) - set(want))
        raise FormatError(f"pysparse.load: the manifest and {path.name} do not match: missing "
                          f"from the file {missing[:5]}, not in the manifest {extra[:5]}")
    for k, (dt, shape) in found.items():
        e = want[k]
        if st_names.get(dt, dt) != e.get("dtype") or shape != e.get("shape"):
            raise FormatError(f"pysparse.load: tensor {k!r} is {st_names.get(dt, dt)} {shape} in "
                              f"{path.name} but {e.get('dtype')} {e.get('shape')} in the manifest")
    return path


def _model_and_config(manifest):
    import transformers
    from transformers import CONFIG_MAPPING

    from .prune import structured
    info = manifest["model"]
    cls = getattr(transformers, str(info.get("class")), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise FormatError(f"pysparse.load: model class {info.get('class')!r} is not a "
                          f"transformers model class in transformers {transformers.__version__}")
    if info.get("pruned_heads"):
        cls = structured.pruned_heads_class(cls)
    cfg = dict(manifest["config"])
    model_type = cfg.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise FormatError(f"pysparse.load: config model_type {model_type!r} is unknown to "
                          f"transformers {transformers.__version__}")
    config_cls = cls.config_class if info.get("pruned_heads") else CONFIG_MAPPING[model_type]
    config = config_cls.from_dict(cfg)
    return cls, config


def _set_module(model, path, module):
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def load(directory, *, backend: str | None = None) -> nn.Module:
    """Rebuild the model that ``pysparse.save`` wrote to ``directory`` (eval mode, on the CPU).

    backend: None (default: each packed layer's saved backend), "cpu" or "reference". The
    packed weights are re-packed for the kernels of this machine; the result computes exactly
    what the saved model computed. Raises FormatError (a ValueError) with the reason when the
    directory is missing, corrupted, truncated, of another format version, or inconsistent."""
    from safetensors import safe_open
    directory = Path(directory)
    manifest = read_manifest(directory)
    path = _check_weights(directory, manifest)
    if backend not in (None, "cpu", "reference"):
        raise ValueError(f"pysparse.load: backend must be None, 'cpu' or 'reference', got "
                         f"{backend!r}")
    modules, tensors = manifest["modules"], manifest["tensors"]
    aliases, shared = manifest["aliases"], manifest["shared_modules"]
    for name, spec in modules.items():
        if spec.get("class") not in _CLASSES:
            raise FormatError(f"pysparse.load: layer {name!r} names an unknown packed class "
                              f"{spec.get('class')!r}")
    for k, target in aliases.items():
        if target not in tensors:
            raise FormatError(f"pysparse.load: tensor {k!r} is tied to {target!r}, which the "
                              f"file does not hold")

    cls, config = _model_and_config(manifest)
    with torch.device("meta"):
        model = cls(config)
    for alias, target in shared.items():
        try:
            _set_module(model, alias, model.get_submodule(target))
        except AttributeError as exc:
            raise FormatError(f"pysparse.load: shared module {alias!r} -> {target!r} does not "
                              f"exist in {type(model).__name__} ({exc})") from None

    with safe_open(str(path), framework="pt") as f:
        data = {k: f.get_tensor(k) for k in f.keys()}
    for name, spec in modules.items():
        prefix = name + "."
        t = {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)
             and tensors[k]["kind"] == "packed"}
        for k, target in aliases.items():
            if k.startswith(prefix):
                t[k[len(prefix):]] = data[target]
        if backend is not None:
            spec = {**spec, "backend": backend}
        try:
            model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"pysparse.load: packed layer {name!r} is not a module of "
                              f"{type(model).__name__} built from the saved config") from None
        _set_module(model, name, _build_packed(spec, t, name))

    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    by_key = {}
    for key, e in list(tensors.items()) + [(k, tensors[v]) for k, v in aliases.items()]:
        if e["kind"] == "packed" or key in by_key:
            continue
        src = data[aliases.get(key, key)]
        if e["kind"] == "parameter" and key in params:
            by_key[key] = ("parameter", src)
        elif e["kind"] == "buffer" and key in buffers:
            by_key[key] = ("buffer", src)
        else:
            raise FormatError(f"pysparse.load: the file holds {e['kind']} {key!r}, which "
                              f"{type(model).__name__} built from the saved config does not have")
    made = {}  # stored key -> Parameter, so tied parameters stay one object
    for key, (kind, src) in by_key.items():
        mod_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(mod_name) if mod_name else model
        if kind == "parameter":
            old = owner._parameters[attr]
            if tuple(old.shape) != tuple(src.shape):
                raise FormatError(f"pysparse.load: parameter {key!r} is {list(src.shape)} in the "
                                  f"file but {list(old.shape)} in the model built from the config")
            stored = aliases.get(key, key)
            if stored not in made:
                made[stored] = nn.Parameter(src, requires_grad=old.requires_grad)
            owner._parameters[attr] = made[stored]
        else:
            owner._buffers[attr] = src
    left = [k for k, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.device.type == "meta"]
    if left:
        raise FormatError(f"pysparse.load: {len(left)} tensor(s) of {type(model).__name__} are "
                          f"not in the file: {left[:5]}")
    model.eval()
    if manifest["model"].get("pysparse_attention"):
        from .replace import replace_attention
        replace_attention(model)
    return model


__all__ = ["save", "load", "read_manifest", "FormatError", "FORMAT_VERSION"]
