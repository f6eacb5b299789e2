"""Helpers shared by tests and benchmarks: tolerances, which backends/ISAs can run here."""
from . import tolerances
from .tolerances import sqnr_db


def native_cpu():
    """The loaded pysparse._C module, or None."""
    from ..ops.backends import cpu
    return cpu._C


def cpu_isas():
    """Names of the CPU kernel paths this machine can run (ref first), e.g. all four on AMX."""
    C = native_cpu()
    if C is None:
        return []
    names = ["ref", "avx2", "avx512_vnni", "amx"]
    top = C.isa_id(C.info()["detected_isa"])
    return names[: top + 1]


def op_backends():
    """Backends to test ops through on this machine (the dispatcher path for 'cpu')."""
    from ..ops.backends import availability
    return [name for name, (ok, _) in availability().items()
            if ok and name in ("cpu", "reference")]


__all__ = ["tolerances", "sqnr_db", "native_cpu", "cpu_isas", "op_backends"]
