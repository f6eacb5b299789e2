"""pysparse: make pretrained Transformer language models smaller and faster.

Public API (stable): replace_linear, replace_attention, prune, calibrate, smooth, prepare_qat,
convert_qat, summary, save, load, export_compressed_tensors, export_onnx. See DESIGN in docs/ARCHITECTURE.md.
"""
from . import ops as _ops  # noqa: F401  (defines torch.ops.pysparse.* and registers backends)
from .prune import prune
from .quant.calibrate import calibrate
from .quant.qat import convert_qat, prepare_qat
from .quant.smoothquant import smooth
from .export import export_compressed_tensors, export_onnx
from .io import load, save
from .replace import Report, replace_attention, replace_linear
from .report import summary

__version__ = "0.1.0"

__all__ = ["replace_linear", "replace_attention", "prune", "calibrate", "smooth", "prepare_qat",
           "convert_qat", "summary", "save", "load", "export_compressed_tensors", "export_onnx", "Report", "__version__"]
