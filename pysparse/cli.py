"""The `pysparse` command: `info` and `demo` (compress/bench/eval arrive with their issues)."""
import argparse
import json
import platform
import sys


def _info(args):
    import torch

    from . import __version__
    from .ops.backends import availability, cpu, forced
    native = cpu._C.info() if cpu._C is not None else None
    info = {
        "pysparse": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "threads": torch.get_num_threads(),
        "cpu_features": native["features"] if native else "unknown (pysparse._C not loaded)",
        "isa_detected": native["detected_isa"] if native else None,
        "isa_active": native["active_isa"] if native else None,
        "kernels": {k: native[k] for k in ("sparse24", "attention") if native and k in native},
        "forced_backend": forced(),
        "backends": {k: {"usable": ok, "why": why} for k, (ok, why) in availability().items()},
    }
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"pysparse {info['pysparse']}  torch {info['torch']}  transformers "
          f"{info['transformers']}  python {info['python']}  ({info['machine']}, "
          f"{info['threads']} threads)")
    print(f"CPU features: {info['cpu_features']}")
    print(f"CPU kernel ISA: {info['isa_active']} (detected: {info['isa_detected']}; cap with "
          "PYSPARSE_CPU_ISA=ref|avx2|avx512_vnni|amx)")
    for name, what in info["kernels"].items():
        print(f"  {name} kernel: {what}")
    if info["forced_backend"]:
        print(f"PYSPARSE_BACKEND forces: {info['forced_backend']}")
    for name, b in info["backends"].items():
        print(f"  {name:<10} {'yes' if b['usable'] else 'no ':<4} {b['why']}")
    return 0


def _demo(args):
    from . import demo
    from .models import ModelNotInstalled
    try:
        result, json_path, png_path = demo.run(args.out, n_texts=args.texts,
                                               progress=not args.no_progress)
    except ModelNotInstalled as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(demo.format_table(result))
    print(f"wrote {json_path}" + (f" and {png_path}" if png_path else
                                   " (install matplotlib for the PNG chart)"))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="pysparse", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("info", help="CPU ISA found, backends usable (and why not), versions")
    pi.add_argument("--json", action="store_true", help="machine-readable output")
    pi.set_defaults(fn=_info)
    pd = sub.add_parser("demo", help="MiniLM under each scheme: bytes, latency, fidelity")
    pd.add_argument("--out", default="pysparse-demo", help="directory for demo.json / demo.png")
    pd.add_argument("--texts", type=int, default=256, help="texts for fidelity (>= 11)")
    pd.add_argument("--no-progress", action="store_true", help="no progress bar")
    pd.set_defaults(fn=_demo)
    args = p.parse_args(argv)
    if getattr(args, "texts", 11) < 11:
        p.error("--texts must be at least 11 (recall@10 needs more than 10 neighbours)")
    try:
        return args.fn(args)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
