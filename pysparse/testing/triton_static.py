"""Build a Triton kernel for a GPU that is not here and read its SASS (tests' gpu_static lane).

``triton.compile`` runs the whole NVIDIA pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas) for a
``GPUTarget`` without a device; ``cuobjdump`` (bundled in Triton's wheel) disassembles the
cubin and reports registers, stack and shared memory. Nothing here imports Triton at import
time.
"""
import importlib.util
import os
import re
import subprocess
import tempfile

SPILL_OPCODES = frozenset({"STL", "LDL", "STL.64", "LDL.64", "STL.128", "LDL.128"})
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory per block


def tool(name):
    """Path of an NVIDIA tool bundled with Triton (or named by TRITON_<NAME>_PATH), or None."""
    import triton
    try:
        return getattr(triton.knobs.nvidia, name).path
    except RuntimeError:
        return None


def skip_reason(arch):
    """Why sm_<arch> code cannot be built and read here, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if tool("cuobjdump") is None:
        return "cuobjdump not found (neither in Triton's wheel nor TRITON_CUOBJDUMP_PATH)"
    ptxas = "ptxas" if arch < 90 else "ptxas_blackwell"  # Triton's choice for sm_90+
    if tool(ptxas) is None:
        return f"{ptxas} not found (neither in Triton's wheel nor TRITON_*_PATH)"
    return None


def cuobjdump(flag, cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([tool("cuobjdump"), flag, f.name], check=True,
                              capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)


def signature(kernel, types, divisible=()):
    """(signature, attrs) for ASTSource: ``types`` maps argument names to Triton types (default
    "i32"); pointers, ``stride_*`` and the ints named in ``divisible`` are marked divisible by
    16, as Triton's launcher specialises them at run time for aligned tensors and sizes."""
    sig, attrs = {}, {}
    for i, p in enumerate(kernel.params):
        sig[p.name] = "constexpr" if p.is_constexpr else types.get(p.name, "i32")
        if (sig[p.name].startswith("*") or p.name.startswith("stride_")
                or p.name in divisible):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def build(kernel, types, constexprs, arch, num_warps, num_stages, divisible=()):
    """Compile for sm_<arch>; return a dict of what the SASS shows: regs, stack_bytes,
    local_bytes, static_smem_bytes, dynamic_smem_bytes, mma (sorted tensor-core opcodes) and
    opcodes (the set of every opcode)."""
    import triton
    from triton.backends.compiler import GPUTarget

    sig, attrs = signature(kernel, types, divisible)
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages,
                                           enable_fp_fusion=True))
    cubin = compiled.asm["cubin"]
    sass = cuobjdump("--dump-sass", cubin)
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)",
                            cuobjdump("--dump-resource-usage", cubin)))
    opcodes = set(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)",
                             sass, re.M))
    return dict(regs=int(usage["REG"]), stack_bytes=int(usage["STACK"]),
                local_bytes=int(usage["LOCAL"]), static_smem_bytes=int(usage["SHARED"]),
                dynamic_smem_bytes=compiled.metadata.shared,
                mma=sorted(o for o in opcodes if "MMA" in o), opcodes=opcodes)


def spill_free(info):
    """No local-memory traffic and no stack frame."""
    return (not info["opcodes"] & SPILL_OPCODES and info["stack_bytes"] == 0
            and info["local_bytes"] == 0)
