"""Quantization parameters: how a tensor's range becomes a scale (and zero point).

Conventions (``b`` = bits, 4 or 8):

* **symmetric**: zero point 0, integer range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (±127, ±7: the
  most negative code is never produced, as in ``formats.int8``), ``scale = max(amax, 1e-12) /
  (2^(b-1) - 1)``. For b = 8 this is ``formats.int8.symmetric_scale`` exactly, so symmetric int8
  per-channel min-max gives the same int8 weight as ``formats.int8.quantize_weight``, bit for bit.
* **asymmetric**: *unsigned* codes in ``[0, 2^b - 1]`` (0..255, 0..15) and an integer zero point
  in the same range: ``x ≈ (q - zero_point) * scale`` with ``scale = max(hi - lo, 1e-12) /
  (2^b - 1)``, ``zero_point = clamp(round(-lo / scale), 0, 2^b - 1)``; the range ``[lo, hi]`` is
  widened to contain 0 so that 0 is exactly representable (padding, ReLU zeros).

Both round half to even (``torch.round``) after dividing by the scale (a division, not a
multiplication by the reciprocal: that is what every pysparse kernel does).

Granularity (what shares one scale):

* ``"tensor"``: the whole tensor, scale shape ``[]``;
* ``"channel"``: each slice along dim 0 (an output channel of a weight ``[N, K]``), scale ``[N]``;
* ``"token"``: each row of the last dim (a token of an activation ``[..., K]``), scale ``[...]``;
* ``"group"``: each run of ``group_size`` consecutive elements of the last dim (``K`` must be a
  multiple), scale ``[..., K / group_size]``.

Methods (how the range is chosen): ``"minmax"`` (the observed range), ``"percentile"`` (the
``percentile``-th percentile of ``|x|`` for symmetric, the ``100 - p`` / ``p`` percentiles for
asymmetric; linear interpolation between order statistics, as ``torch.quantile``) and ``"mse"``
(the min-max range shrunk by the ratio ``r`` in ``{1/grid, 2/grid, ..., 1}`` that minimises the
mean squared quantization error of the slice; ties keep the larger ratio).

The functional API is ``qparams`` / ``quantize`` / ``dequantize`` / ``fake_quantize``. Stateful
observers (``MinMaxObserver``, ``PercentileObserver``, ``MSEObserver``, made by
``make_observer``) accumulate over calibration batches: exact running min/max, and a bounded,
uniformly drawn reservoir of samples for the percentile and MSE searches.
"""
import torch

from ..formats import int8 as _int8

EPS = _int8.EPS  # floor on a range
BITS = (4, 8)
GRANULARITIES = ("tensor", "channel", "token", "group")
METHODS = ("minmax", "percentile", "mse")


def qrange(bits: int, symmetric: bool = True) -> tuple:
    """(qmin, qmax) of the integer codes."""
    _check_bits(bits)
    if symmetric:
        m = 2 ** (bits - 1) - 1
        return -m, m
    return 0, 2 ** bits - 1


def _check_bits(bits):
    if bits not in BITS:
        raise ValueError(f"pysparse.quant: bits must be one of {BITS}, got {bits!r}")


def _check(granularity, method=None, group_size=None, x=None, who="qparams"):
    if granularity not in GRANULARITIES:
        raise ValueError(f"pysparse.quant.{who}: unknown granularity {granularity!r}; choose one "
                         f"of {GRANULARITIES}")
    if method is not None and method not in METHODS:
        raise ValueError(f"pysparse.quant.{who}: unknown method {method!r}; choose one of "
                         f"{METHODS}")
    if granularity == "group":
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
            raise ValueError(f"pysparse.quant.{who}: group_size must be a positive int, got "
                             f"{group_size!r}")
        if x is not None and (x.dim() < 1 or x.shape[-1] % group_size):
            raise ValueError(f"pysparse.quant.{who}: the last dim ({x.shape[-1] if x.dim() else 0})"
                             f" is not a multiple of group_size={group_size}")
    if x is not None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"pysparse.quant.{who}: expected a floating-point tensor")
        if x.numel() == 0:
            raise ValueError(f"pysparse.quant.{who}: empty tensor")
        if granularity == "channel" and x.dim() < 1:
            raise ValueError(f"pysparse.quant.{who}: per-channel needs at least 1 dim")


def _rows(x, granularity, group_size):
    """x as a 2-D [slices, elements] view (one row per scale) and the scale's shape."""
    if granularity == "tensor":
        return x.reshape(1, -1), ()
    if granularity == "channel":
        return x.reshape(x.shape[0], -1), (x.shape[0],)
    if granularity == "token":
        return x.reshape(-1, x.shape[-1]), tuple(x.shape[:-1])
    return x.reshape(-1, group_size), (*x.shape[:-1], x.shape[-1] // group_size)


def _expand(t, x, granularity, group_size):
    """scale / zero point broadcast against x (for "group": against x viewed [..., K/G, G])."""
    if granularity == "tensor":
        return t.reshape(())
    if granularity == "channel":
        return t.reshape(x.shape[0], *([1] * (x.dim() - 1)))
    return t.unsqueeze(-1)


def range_to_qparams(lo, hi, bits=8, symmetric=True):
    """(scale fp32, zero_point int32) from a range: lo/hi are per-slice minima/maxima (for
    symmetric only ``max(|lo|, |hi|)`` matters)."""
    qmin, qmax = qrange(bits, symmetric)
    lo, hi = lo.float(), hi.float()
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = _int8.symmetric_scale(amax) if bits == 8 else amax.clamp_min(EPS) / qmax
        return scale, torch.zeros(amax.shape, dtype=torch.int32, device=amax.device)
    lo, hi = lo.clamp_max(0), hi.clamp_min(0)
    scale = (hi - lo).clamp_min(EPS) / qmax
    zp = torch.round(-lo / scale).clamp_(qmin, qmax).to(torch.int32)
    return scale, zp


def _quantize_rows(r, scale, zp, qmin, qmax):
    """r [R, n] float, scale/zp [R] -> codes as float (exact small integers)."""
    return (torch.round(r / scale[:, None]) + zp[:, None]).clamp_(qmin, qmax)


def _percentile(r, q):
    """Per-row q-quantile (q in [0, 1]) with linear interpolation, as torch.quantile (which
    refuses large inputs)."""
    n = r.shape[1]
    s = torch.sort(r, dim=1).values
    pos = q * (n - 1)
    lo = int(pos // 1)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return s[:, lo] + (s[:, hi] - s[:, lo]) * frac


def _mse_search(r, lo, hi, bits, symmetric, grid):
    """Per row, the ratio in {1/grid .. 1} of the [lo, hi] range minimising the quantization MSE
    on r's samples; returns (scale, zp) of the best ratio (ties keep the larger ratio)."""
    qmin, qmax = qrange(bits, symmetric)
    best_err = torch.full((r.shape[0],), float("inf"), device=r.device)
    best_scale = best_zp = None
    for i in range(grid, 0, -1):
        ratio = i / grid
        scale, zp = range_to_qparams(lo * ratio, hi * ratio, bits, symmetric)
        q = _quantize_rows(r, scale, zp, qmin, qmax)
        err = ((q - zp[:, None]) * scale[:, None] - r).pow_(2).mean(dim=1)
        better = err < best_err
        if best_scale is None:
            best_scale, best_zp = scale.clone(), zp.clone()
        else:
            best_scale = torch.where(better, scale, best_scale)
            best_zp = torch.where(better, zp, best_zp)
        best_err = torch.where(better, err, best_err)
    return best_scale, best_zp


def _rows_qparams(r, bits, symmetric, method, percentile, grid, lo=None, hi=None):
    """(scale, zp) per row of r [R, n] (fp32). lo/hi: the exact range when r is a sample."""
    if lo is None:
        lo, hi = r.amin(dim=1), r.amax(dim=1)
    if method == "minmax":
        return range_to_qparams(lo, hi, bits, symmetric)
    if method == "percentile":
        p = percentile / 100.0
        if symmetric:
            amax = _percentile(r.abs(), p)
            return range_to_qparams(-amax, amax, bits, symmetric)
        return range_to_qparams(_percentile(r, 1.0 - p), _percentile(r, p), bits, symmetric)
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        lo, hi = -amax, amax
    return _mse_search(r, lo, hi, bits, symmetric, grid)


def _check_method_args(percentile, grid):
    if not 0.0 < float(percentile) <= 100.0:
        raise ValueError(f"pysparse.quant: percentile must be in (0, 100], got {percentile!r}")
    if not isinstance(grid, int) or grid < 1:
        raise ValueError(f"pysparse.quant: grid must be a positive int, got {grid!r}")


@torch.no_grad()
def qparams(x: torch.Tensor, bits: int = 8, granularity: str = "tensor", symmetric: bool = True,
            method: str = "minmax", group_size: int | None = None, *,
            percentile: float = 99.99, grid: int = 100):
    """(scale fp32, zero_point int32) of ``x`` for the given granularity (module docstring).

    Shapes: "tensor" ``[]``, "channel" ``[x.shape[0]]``, "token" ``x.shape[:-1]``, "group"
    ``[*x.shape[:-1], K / group_size]``. Symmetric zero points are 0.
    """
    _check_bits(bits)
    _check(granularity, method, group_size, x)
    _check_method_args(percentile, grid)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("pysparse.quant.qparams: x contains NaN or Inf")
    r, shape = _rows(x.detach().float(), granularity, group_size)
    scale, zp = _rows_qparams(r, bits, symmetric, method, percentile, grid)
    return scale.reshape(shape), zp.reshape(shape)


def quantize(x, scale, zero_point=None, bits=8, granularity="tensor", symmetric=True,
             group_size=None):
    """Integer codes of x: int8 for symmetric (and asymmetric 4-bit), uint8 for asymmetric 8-bit.
    ``q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)``."""
    _check_bits(bits)
    _check(granularity, None, group_size, x, who="quantize")
    qmin, qmax = qrange(bits, symmetric)
    xf = x.float()
    shape = x.shape
    if granularity == "group":
        xf = xf.reshape(*shape[:-1], shape[-1] // group_size, group_size)
    q = torch.round(xf / _expand(scale.float(), x, granularity, group_size))
    if not symmetric and zero_point is not None:
        q = q + _expand(zero_point, x, granularity, group_size)
    dtype = torch.uint8 if (not symmetric and bits == 8) else torch.int8
    return q.clamp_(qmin, qmax).to(dtype).reshape(shape)


def dequantize(q, scale, zero_point=None, granularity="tensor", symmetric=True, group_size=None,
               dtype=torch.float32):
    """``(q - zero_point) * scale`` in fp32, cast to ``dtype``."""
    shape = q.shape
    qf = q.float()
    if granularity == "group":
        qf = qf.reshape(*shape[:-1], shape[-1] // group_size, group_size)
    if not symmetric and zero_point is not None:
        qf = qf - _expand(zero_point, q, granularity, group_size).float()
    return (qf * _expand(scale.float(), q, granularity, group_size)).reshape(shape).to(dtype)


def fake_quantize(x, scale, zero_point=None, bits=8, granularity="tensor", symmetric=True,
                  group_size=None):
    """quantize then dequantize, in x's dtype (no gradient rule: see quant.qat for the STE)."""
    q = quantize(x, scale, zero_point, bits, granularity, symmetric, group_size)
    return dequantize(q, scale, zero_point, granularity, symmetric, group_size, x.dtype)


def quant_error(x, bits=8, granularity="tensor", symmetric=True, method="minmax",
                group_size=None, **kw) -> float:
    """Mean squared error of fake-quantizing x with qparams(x, ...)."""
    scale, zp = qparams(x, bits, granularity, symmetric, method, group_size, **kw)
    y = fake_quantize(x.float(), scale, zp, bits, granularity, symmetric, group_size)
    return float((y - x.float()).pow(2).mean())


# ----------------------------------------------------------------------------- stateful
class Observer:
    """Accumulates statistics over calibration batches; ``qparams()`` turns them into (scale,
    zero_point). granularity "tensor" (one scale) or "channel" (one per index along ``ch_axis``:
    0 for a weight's output channels, -1 for an activation's features).

    ``amin`` / ``amax`` hold the exact running minimum / maximum (per channel)."""

    method = ""

    def __init__(self, bits=8, symmetric=True, granularity="tensor", ch_axis=0):
        _check_bits(bits)
        if granularity not in ("tensor", "channel"):
            raise ValueError(f"pysparse.quant.{type(self).__name__}: stateful observers take "
                             f"granularity 'tensor' or 'channel', got {granularity!r} (per-token "
                             f"and per-group scales are computed per call with qparams)")
        self.bits, self.symmetric = bits, symmetric
        self.granularity, self.ch_axis = granularity, ch_axis
        self.amin = self.amax = None
        self.count = 0

    def _as_rows(self, x):
        x = x.detach().float()
        if self.granularity == "tensor":
            return x.reshape(1, -1)
        return x.movedim(self.ch_axis, 0).reshape(x.shape[self.ch_axis], -1)

    @torch.no_grad()
    def update(self, x: torch.Tensor):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"pysparse.quant.{type(self).__name__}.update: expected a "
                             f"floating-point tensor")
        if x.numel() == 0:
            return self
        r = self._as_rows(x)
        if not bool(torch.isfinite(r).all()):
            raise ValueError(f"pysparse.quant.{type(self).__name__}.update: x contains NaN or Inf")
        lo, hi = r.amin(dim=1), r.amax(dim=1)
        if self.amin is None:
            self.amin, self.amax = lo, hi
        else:
            if lo.shape != self.amin.shape:
                raise ValueError(f"pysparse.quant.{type(self).__name__}.update: {lo.shape[0]} "
                                 f"channels, earlier batches had {self.amin.shape[0]}")
            self.amin, self.amax = torch.minimum(self.amin, lo), torch.maximum(self.amax, hi)
        self.count += r.shape[1]
        self._update_samples(r)
        return self

    def _update_samples(self, r):
        pass

    def _require(self):
        if self.amin is None:
            raise RuntimeError(f"pysparse.quant.{type(self).__name__}: no data observed yet")

    def _shape(self, t):
        return t.reshape(()) if self.granularity == "tensor" else t

    def qparams(self):
        self._require()
        scale, zp = self._qparams()
        return self._shape(scale), self._shape(zp)

    def _qparams(self):
        return range_to_qparams(self.amin, self.amax, self.bits, self.symmetric)


class MinMaxObserver(Observer):
    """Running min / max."""

    method = "minmax"


class _ReservoirObserver(Observer):
    """Keeps a uniform sample (without replacement) of at most ``max_samples`` values per channel
    of everything seen: every value gets a random key and the smallest keys are kept (bottom-k
    sampling), so the sample does not depend on how the data were split into batches."""

    def __init__(self, bits=8, symmetric=True, granularity="tensor", ch_axis=0,
                 max_samples=1 << 18, seed=0):
        super().__init__(bits, symmetric, granularity, ch_axis)
        if not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"pysparse.quant: max_samples must be a positive int, got "
                             f"{max_samples!r}")
        self.max_samples = max_samples
        self._gen = torch.Generator().manual_seed(seed)
        self.samples = self._keys = None

    def _update_samples(self, r):
        keys = torch.rand(r.shape[1], generator=self._gen).to(r.device)
        if self.samples is not None:
            r = torch.cat([self.samples, r], dim=1)
            keys = torch.cat([self._keys, keys])
        cap = max(1, self.max_samples // r.shape[0])  # columns (one value per channel each)
        if keys.numel() > cap:
            keep = torch.topk(keys, cap, largest=False).indices
            r, keys = r[:, keep], keys[keep]
        self.samples, self._keys = r, keys


class PercentileObserver(_ReservoirObserver):
    """Range from the ``percentile``-th percentile of the reservoir sample (|x| for symmetric;
    the 100 - p and p percentiles for asymmetric)."""

    method = "percentile"

    def __init__(self, bits=8, symmetric=True, granularity="tensor", ch_axis=0, percentile=99.99,
                 max_samples=1 << 18, seed=0):
        super().__init__(bits, symmetric, granularity, ch_axis, max_samples, seed)
        _check_method_args(percentile, 1)
        self.percentile = percentile

    def _qparams(self):
        return _rows_qparams(self.samples, self.bits, self.symmetric, "percentile",
                             self.percentile, 1)


class MSEObserver(_ReservoirObserver):
    """The running min-max range shrunk by the ratio (of ``grid`` candidates) that minimises the
    quantization MSE of the reservoir sample."""

    method = "mse"

    def __init__(self, bits=8, symmetric=True, granularity="tensor", ch_axis=0, grid=100,
                 max_samples=1 << 18, seed=0):
        super().__init__(bits, symmetric, granularity, ch_axis, max_samples, seed)
        _check_method_args(100.0, grid)
        self.grid = grid

    def _qparams(self):
        return _rows_qparams(self.samples, self.bits, self.symmetric, "mse", 100.0, self.grid,
                             lo=self.amin, hi=self.amax)


OBSERVERS = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "mse": MSEObserver}


def make_observer(method="minmax", **kwargs) -> Observer:
    """A stateful observer for ``method`` ("minmax" | "percentile" | "mse")."""
    if method not in OBSERVERS:
        raise ValueError(f"pysparse.quant: unknown calibration method {method!r}; choose one of "
                         f"{', '.join(map(repr, OBSERVERS))}")
    return OBSERVERS[method](**kwargs)


__all__ = ["qrange", "qparams", "quantize", "dequantize", "fake_quantize", "quant_error",
           "range_to_qparams", "Observer", "MinMaxObserver", "PercentileObserver", "MSEObserver",
           "make_observer", "BITS", "GRANULARITIES", "METHODS"]
