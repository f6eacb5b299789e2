"""Run a grid of Triton-kernel cases under ``TRITON_INTERPRET=1`` (tests' interpret lane).

Triton picks the interpreter when ``@triton.jit`` decorates, i.e. at import, so a test file
runs its whole grid in one subprocess (the file itself as a script, ``TRITON_INTERPRET=1``) and
pytest reports one result per case from the JSON it writes:

* in the test file: ``if __name__ == "__main__": run_grid(CASES, _check_case, sys.argv[1])``;
* its fixture: ``return run_script(__file__, tmp_path_factory.mktemp("interpret"))``.
"""
import json
import os
import subprocess
import sys
import traceback


def install_bf16_dot_fix():
    """Triton 3.9's interpreter keeps bf16 as raw uint16 and its tl.dot multiplies those bit
    patterns (triton-lang/triton#11584, closed as "not supported yet"). Widen bf16 operands to
    fp32 first, which is what the tensor cores do (bf16 x bf16 products are exact in fp32,
    accumulated in fp32). Applied only if a probe shows the bug, so a fixed Triton runs as is."""
    import numpy as np
    import torch
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    @triton.jit
    def probe(a_ptr, c_ptr):
        r = tl.arange(0, 16)
        a = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
        tl.store(c_ptr + r[:, None] * 16 + r[None, :], tl.dot(a, a))

    eye, c = torch.eye(16, dtype=torch.bfloat16), torch.zeros(16, 16)
    probe[(1,)](eye, c)
    if torch.equal(c, torch.eye(16)):
        return False

    original = interpreter.InterpreterBuilder.create_dot

    def widen(t):
        if t.dtype.scalar != tl.bfloat16:
            return t
        bits = t.data.astype(np.uint32) << 16  # bf16 is the top half of an fp32
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot
    return True


def run_grid(cases: dict, check_case, out_path):
    """Script side: run ``check_case(case, seed)`` for every case (seed = its position) and
    write {name: None, or the traceback of its failure} to ``out_path``."""
    import pysparse  # noqa: F401  (registers the ops, the *_triton ones included)

    install_bf16_dot_fix()
    results = {}
    for seed, (name, c) in enumerate(cases.items()):
        try:
            check_case(c, seed)
            results[name] = None
        except Exception:  # noqa: BLE001 - reported per case by the pytest side
            results[name] = traceback.format_exc(limit=-3)
    with open(out_path, "w") as f:
        json.dump(results, f)


def run_script(script, out_dir, timeout=600):
    """Pytest side: run ``script`` under the interpreter (from the repository root) and return
    its {name: error or None}; raise AssertionError with its stderr if it did not finish."""
    out = os.path.join(str(out_dir), "results.json")
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, script, out], env=env, capture_output=True,
                          text=True, timeout=timeout,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(script))))
    if proc.returncode != 0 or not os.path.exists(out):
        raise AssertionError(f"interpreter subprocess failed (rc={proc.returncode}):\n"
                             f"{proc.stderr[-4000:]}")
    with open(out) as f:
        return json.load(f)
