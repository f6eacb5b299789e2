"""The `pysparse` command: compress, eval, export, bench, info, demo.

Every command takes --help; --json prints one JSON document on stdout (progress bars and notes go
to stderr). Exit codes: 0 done, 1 the input was refused (the message says why; no traceback),
2 bad command line, 130 interrupted. PYSPARSE_DEBUG=1 shows the traceback of a refused input.
"""
import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _emit(args, data, text):
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


def _note(msg):
    print(msg, file=sys.stderr)


# --------------------------------------------------------------------------------------------
# info


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
    if args.model is not None:
        from .io import read_manifest
        from .report import summary
        m = read_manifest(args.model)
        info["model_dir"] = {"path": str(args.model), "class": m["model"]["class"],
                             "saved_with": {k: m[k] for k in ("pysparse_version", "torch_version",
                                                               "transformers_version")},
                             "extra": m.get("extra", {}),
                             "weights_bytes": m["weights"]["bytes"],
                             "layers": {n: s["scheme"] for n, s in m["modules"].items()}}
        if args.layers:
            from .io import load
            info["model_dir"]["summary"] = [r.__dict__ for r in summary(load(args.model))]
    lines = [f"pysparse {info['pysparse']}  torch {info['torch']}  transformers "
             f"{info['transformers']}  python {info['python']}  ({info['machine']}, "
             f"{info['threads']} threads)",
             f"CPU features: {info['cpu_features']}",
             f"CPU kernel ISA: {info['isa_active']} (detected: {info['isa_detected']}; cap with "
             "PYSPARSE_CPU_ISA=ref|avx2|avx512_vnni|amx)"]
    lines += [f"  {name} kernel: {what}" for name, what in info["kernels"].items()]
    if info["forced_backend"]:
        lines.append(f"PYSPARSE_BACKEND forces: {info['forced_backend']}")
    lines += [f"  {name:<10} {'yes' if b['usable'] else 'no ':<4} {b['why']}"
              for name, b in info["backends"].items()]
    if "model_dir" in info:
        d = info["model_dir"]
        schemes = {}
        for s in d["layers"].values():
            schemes[s] = schemes.get(s, 0) + 1
        lines.append(f"{d['path']}: {d['class']}, {d['weights_bytes'] / 1e6:.2f} MB on disk, "
                     f"packed layers: {', '.join(f'{v} {k}' for k, v in schemes.items()) or 'none'}"
                     f"; saved with pysparse {d['saved_with']['pysparse_version']}")
        if d["extra"].get("recipe"):
            lines.append(f"  recipe: {json.dumps(d['extra']['recipe'])}")
        for r in d.get("summary", ()):
            lines.append(f"  {r['name']:<48} {r['scheme']:<12} {r['weight_bytes']:>10} B  "
                         f"sparsity {r['sparsity']:.2f}")
    _emit(args, info, "\n".join(lines))
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# demo


def _demo(args):
    from . import demo
    result, json_path, png_path = demo.run(args.out, n_texts=args.texts,
                                           progress=not args.no_progress)
    result = {**result, "json": str(json_path), "png": str(png_path) if png_path else None}
    text = demo.format_table(result) + "\n" + (
        f"wrote {json_path}" + (f" and {png_path}" if png_path else
                                " (install matplotlib for the PNG chart)"))
    _emit(args, result, text)
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# compress


def _compress(args):
    from . import pipeline
    if args.qat and not (args.distill and pipeline.distill_qat(args.scheme, args.activation,
                                                               args.smooth)):
        raise ValueError("pysparse compress: --qat needs --distill and scheme w8a8 or 2:4+w8a8 "
                         "with dynamic activations and no --smooth")
    from .io import save
    progress = not args.no_progress
    t0 = time.perf_counter()
    _note(f"loading {args.model or 'the bundled all-MiniLM-L6-v2'}")
    model, tok, source = pipeline.load_model(args.model)
    calib = None
    if args.calib is not None:
        calib, _ = pipeline.read_texts(args.calib)
        calib = calib[:args.calib_n]
    elif args.calib_n != 128:
        calib = pipeline.default_texts("calib", args.calib_n)
    train = None
    if args.train is not None:
        train, _ = pipeline.read_texts(args.train)
    distill_options = {}
    if args.quick:
        distill_options.update(max_steps=8, batch_size=8)
        if args.calib is None and args.calib_n == 128:
            calib = pipeline.default_texts("calib", 16)
            args.calib_n = 16
        if train is None:
            train = pipeline.default_texts("train", 64)
    if args.distill_steps is not None:
        distill_options["max_steps"] = args.distill_steps
    if args.distill_lr is not None:
        distill_options["learning_rate"] = args.distill_lr
    if args.no_bf16:
        distill_options["bf16"] = False
    if args.qat:
        distill_options.update(pipeline.DISTILL_QAT)
    recipe = {k: getattr(args, k) for k in ("scheme", "prune", "pattern", "sparsity", "activation",
                                             "smooth", "awq", "gptq", "group_size", "attention",
                                             "max_fidelity_loss", "tokens", "share", "distill",
                                             "quick")}
    if args.distill:
        recipe["distill_options"] = {**pipeline.DISTILL_DEFAULTS, **distill_options}
        recipe["train"] = str(args.train) if args.train else "bundled train split"
        if not args.no_progress:
            _note("distilling from the uncompressed model (pysparse.distill); --quick for a "
                  "smoke run, --distill-steps N to trade time for fidelity")
    recipe["calib"] = str(args.calib) if args.calib else f"bundled ({args.calib_n} texts)"
    with contextlib.redirect_stdout(sys.stderr):  # training logs must not mix with --json
        done = pipeline.compress(
            model, tok, scheme=args.scheme, prune=args.prune, pattern=args.pattern,
            sparsity=args.sparsity, calib=calib, activation=args.activation, smooth=args.smooth,
            awq=args.awq, gptq=args.gptq, group_size=args.group_size, attention=args.attention,
            max_fidelity_loss=args.max_fidelity_loss, tokens=args.tokens, share=args.share,
            distill=args.distill, train=train, distill_options=distill_options,
            progress=progress)
    out = save(model, args.out, tokenizer=tok, overwrite=args.overwrite,
               extra={"source": source, "recipe": recipe,
                      "steps": [{k: v for k, v in s.items() if k != "report"}
                                for s in done["steps"]]})
    result = {"out": str(out), "source": source, "recipe": recipe, **done,
              "seconds": round(time.perf_counter() - t0, 2)}
    b = done["bytes"]
    lines = [f"compressed {source} -> {out} in {result['seconds']:.1f} s"]
    for s in done["steps"]:
        counts = ", ".join(f"{v} {k}" for k, v in s.get("counts", {}).items())
        lines.append(f"  {s['step']:<28} {s['seconds']:>7.1f} s  {counts}")
    lines.append(f"  linear weights: {b['linear_before'] / 1e6:.2f} MB -> "
                 f"{b['linear_after'] / 1e6:.2f} MB ({b['linear_before'] / max(b['linear_after'], 1):.2f}x smaller)")
    lines.append(f"reload with pysparse.load({str(out)!r}); measure with `pysparse eval {out}`")
    if args.verbose:
        for s in done["steps"]:
            if "report" in s:
                lines.append(json.dumps(s["report"], indent=1))
    _emit(args, result, "\n".join(lines))
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# eval


def _eval(args):
    from transformers import AutoTokenizer

    from . import pipeline
    from .io import load, read_manifest
    manifest = read_manifest(args.dir)
    model = load(args.dir)
    tok_dir = Path(args.dir)
    if not any((tok_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                 "vocab.txt")):
        source = manifest.get("extra", {}).get("source")
        if args.reference is None and source is None:
            raise ValueError(f"{args.dir} has no tokenizer files and no recorded source model; "
                             f"pass --reference MODEL_DIR")
        tok_dir = Path(args.reference or source)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if args.data is not None:
        texts, labels = pipeline.read_texts(args.data)
        texts = texts[:args.n] if args.n else texts
        labels = labels[:len(texts)] if labels is not None else None
        data_name = str(args.data)
    else:
        recs = pipeline.default_texts("eval", args.n or 256, sections=True)
        texts, labels = [t for t, _ in recs], [s for _, s in recs]
        data_name = f"bundled Debian descriptions ({len(texts)}, label = section)"
    reference = None
    ref_path = None if args.no_reference else (args.reference or
                                               manifest.get("extra", {}).get("source"))
    if ref_path is not None:
        if (Path(ref_path) / "pysparse.json").exists():
            reference = load(ref_path)
        else:
            reference, _, ref_path = pipeline.load_model(ref_path)
    elif not args.no_reference:
        _note("no reference model (none recorded, no --reference): accuracy only")
    if reference is None and labels is None:
        raise ValueError("nothing to measure: no reference model and the data has no labels")
    res = pipeline.evaluate(model, tok, texts, reference=reference, labels=labels,
                            batch_size=args.batch_size, max_length=args.max_length,
                            progress=not args.no_progress)
    res = {"dir": str(args.dir), "data": data_name, "reference": ref_path, **res}
    lines = [f"{args.dir} on {data_name}" + (f", against {ref_path}" if ref_path else "")]
    if "cosine" in res:
        lines.append(f"  mean cosine vs reference  {res['cosine']:.5f}")
    if "recall@10" in res:
        lines.append(f"  recall@10 vs reference    {res['recall@10']:.4f}")
    if "accuracy_model" in res:
        lines.append(f"  accuracy ({res['accuracy_kind']})  {res['accuracy_model']:.4f}"
                     + (f"  reference {res['accuracy_reference']:.4f}  retention "
                        f"{res['accuracy_retention']:.2%}" if "accuracy_retention" in res else ""))
    lines.append(f"  linear weights {res['linear_weight_bytes'] / 1e6:.2f} MB"
                 + (f" (reference {res['reference_linear_weight_bytes'] / 1e6:.2f} MB)"
                    if "reference_linear_weight_bytes" in res else ""))
    _emit(args, res, "\n".join(lines))
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# export


def _export(args):
    from .export import export_compressed_tensors, export_onnx
    from .io import load
    model = load(args.dir, backend="reference" if args.to == "onnx" else None)
    if args.to == "compressed-tensors":
        tok = None
        if any((Path(args.dir) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(args.dir)
        qc = export_compressed_tensors(model, args.out, tokenizer=tok)
        res = {"to": args.to, "out": str(args.out), "quantization_config": qc}
        text = (f"wrote {args.out} (compressed-tensors, format {qc.get('format')}); load it with "
                f"vLLM or transformers' compressed-tensors integration")
    else:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(args.dir)
        out = Path(args.out)
        if out.suffix != ".onnx":
            out = out / "model.onnx"
        out.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(model, out, tokenizer=tok,
                    unsupported="error" if args.strict else "dequantize")
        res = {"to": args.to, "out": str(out), "bytes": out.stat().st_size}
        text = f"wrote {out} ({res['bytes'] / 1e6:.2f} MB, int8 weights as QDQ)"
    _emit(args, res, text)
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# bench


def _ints(text, what):
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated integers, got "
                                         f"{text!r}") from None
    if not vals or min(vals) <= 0:
        raise argparse.ArgumentTypeError(f"{what} must be positive integers, got {text!r}")
    return vals


def _pairs_of(what, usage):
    """argparse type: "AxB[,AxB...]" -> ((A, B), ...), positive integers."""
    def parse(text):
        out = []
        for part in text.split(","):
            try:
                x, y = (int(v) for v in part.lower().split("x"))
            except ValueError:
                raise argparse.ArgumentTypeError(f"{what} are {usage}, got {part!r}") from None
            if x <= 0 or y <= 0:
                raise argparse.ArgumentTypeError(f"{what} must be positive, got {part!r}")
            out.append((x, y))
        return tuple(out)
    return parse


_shapes = _pairs_of("shapes", "NxK[,NxK...]")
_pairs = _pairs_of("sizes", "BATCHxSEQ[,...]")


def _bench(args):
    from . import benchmark
    progress = not args.no_progress
    if args.what == "kernels":
        kw = {}
        if args.shapes:
            kw["shapes"] = args.shapes
        if args.m:
            kw["ms"] = args.m
        if args.schemes:
            kw["schemes"] = tuple(args.schemes.split(","))
        res = benchmark.run_kernels(args.out, budget_s=args.budget, progress=progress, **kw)
    else:
        kw = {"shapes": args.sizes} if args.sizes else {}
        res = benchmark.run_model(args.out, model_dir=args.model, progress=progress, **kw)
    md = res.get("paths", {}).get("md") or res.get("md")
    text = Path(md).read_text() if md and Path(md).exists() else json.dumps(res, indent=1,
                                                                            default=str)
    _emit(args, res, text + f"\nwrote {args.out}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------


def _parser():
    p = argparse.ArgumentParser(prog="pysparse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(name, fn, help_, desc=None):
        sp = sub.add_parser(name, help=help_, description=desc or help_)
        sp.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        sp.set_defaults(fn=fn)
        return sp

    from .pipeline import PRUNE_METHODS, SCHEMES
    pc = add("compress", _compress, "prune / quantize a model and save it (pysparse.save)",
             "Compress MODEL (a local transformers directory; default: the bundled "
             "all-MiniLM-L6-v2) and write it to --out; reload with pysparse.load(OUT).")
    pc.add_argument("model", nargs="?", default=None, metavar="MODEL",
                    help="local model directory (default: bundled MiniLM)")
    pc.add_argument("--scheme", default="w8a8", choices=SCHEMES,
                    help="what replace_linear packs the linear layers into (default w8a8; "
                         "fp32 keeps them float; auto measures per layer)")
    pc.add_argument("--prune", choices=PRUNE_METHODS, default=None,
                    help="pruning criterion (default magnitude when a 2:4 scheme or --pattern "
                         "/ --sparsity asks for pruning)")
    pc.add_argument("--pattern", default=None,
                    help="2:4 (default for 2:4 schemes), another N:M, heads, neurons or layers")
    pc.add_argument("--sparsity", type=float, default=None,
                    help="fraction removed: unstructured (no --pattern) or heads/neurons/layers")
    pc.add_argument("--calib", type=Path, default=None,
                    help="calibration texts (.txt lines or .jsonl 'text'); default: bundled "
                         "Debian descriptions disjoint from eval's")
    pc.add_argument("--calib-n", type=int, default=128, help="calibration texts used (128)")
    pc.add_argument("--activation", choices=("dynamic", "static"), default="dynamic",
                    help="w8a8 activation scales: per token at run time, or calibrated static")
    pc.add_argument("--smooth", type=float, default=None, metavar="ALPHA",
                    help="SmoothQuant migration strength before w8a8 (e.g. 0.5)")
    pc.add_argument("--awq", action="store_true", help="AWQ scaling before w4 / w8")
    pc.add_argument("--gptq", action="store_true", help="GPTQ weights for w4 / w8")
    pc.add_argument("--group-size", type=int, default=128, help="w4 group size (128)")
    pc.add_argument("--attention", action="store_true",
                    help="also run attention on pysparse's fused kernel")
    pc.add_argument("--max-fidelity-loss", type=float, default=None,
                    help="scheme auto: per-layer relative error budget")
    pc.add_argument("--tokens", type=lambda t: _ints(t, "--tokens"), default=None,
                    help="scheme auto: token counts to optimise for, e.g. 128,4096")
    pc.add_argument("--share", type=int, default=None, metavar="K",
                    help="tie every K consecutive transformer blocks (ALBERT-style)")
    pc.add_argument("--distill", action="store_true",
                    help="after pruning / sharing, distill from the uncompressed model")
    pc.add_argument("--train", type=Path, default=None,
                    help="distillation texts (.txt / .jsonl); default: bundled train split")
    pc.add_argument("--distill-steps", type=int, default=None,
                    help="optimizer steps (default 1550: about 26 min on 2 cores for MiniLM)")
    pc.add_argument("--distill-lr", type=float, default=None,
                    help="peak learning rate (5e-4)")
    pc.add_argument("--no-bf16", action="store_true",
                    help="distill in fp32 (default: bf16 autocast, fp32 master weights)")
    pc.add_argument("--qat", action="store_true",
                    help="with --distill and a w8a8 scheme: W8A8 fake-quant (QAT) in the last "
                         "quarter of the distillation steps")
    pc.add_argument("--quick", action="store_true",
                    help="smoke-test sizes: 16 calibration texts, 8 distillation steps")
    pc.add_argument("--out", type=Path, required=True, help="output directory")
    pc.add_argument("--overwrite", action="store_true",
                    help="write into a non-empty directory that holds no pysparse save")
    pc.add_argument("--verbose", action="store_true", help="print every step's per-layer report")
    pc.add_argument("--no-progress", action="store_true", help="no progress bars")

    pe = add("eval", _eval, "fidelity (and accuracy, for labelled data) of a saved model",
             "Load DIR (pysparse.save) and measure: mean cosine and recall@10 of sentence "
             "embeddings against the reference (the model it was compressed from, or "
             "--reference), and accuracy when the data has labels.")
    pe.add_argument("dir", type=Path, metavar="DIR", help="a directory written by pysparse")
    pe.add_argument("--data", type=Path, default=None,
                    help=".txt or .jsonl ('text', optional 'label'); default: 256 bundled "
                         "Debian descriptions labelled with their section")
    pe.add_argument("--n", type=int, default=None, help="use the first N texts")
    pe.add_argument("--reference", default=None, metavar="MODEL_DIR",
                    help="reference model directory (default: the recorded source)")
    pe.add_argument("--no-reference", action="store_true", help="accuracy only")
    pe.add_argument("--batch-size", type=int, default=32)
    pe.add_argument("--max-length", type=int, default=128)
    pe.add_argument("--no-progress", action="store_true", help="no progress bars")

    pb = add("bench", _bench, "kernel or model speed: Markdown + JSON report and PNG charts",
             "kernels: packed linear layers vs torch fp32 over M, with the floor; model: "
             "latency of a saved model (or the bundled MiniLM under each scheme) vs fp32.")
    pb.add_argument("what", choices=("kernels", "model"), help="what to measure")
    pb.add_argument("--model", type=Path, default=None, help="(model) a pysparse directory")
    pb.add_argument("--shapes", type=_shapes, default=None, help="(kernels) NxK[,NxK...]")
    pb.add_argument("--m", type=lambda t: _ints(t, "--m"), default=None,
                    help="(kernels) token counts, e.g. 1,16,128")
    pb.add_argument("--schemes", default=None, help="(kernels) e.g. w8a8,2:4+w8a8")
    pb.add_argument("--sizes", type=_pairs, default=None, help="(model) BATCHxSEQ[,...]")
    pb.add_argument("--budget", type=float, default=0.2, help="(kernels) seconds per timing")
    pb.add_argument("--out", type=Path, default=Path("pysparse-bench"), help="report directory")
    pb.add_argument("--no-progress", action="store_true", help="no progress bars")

    px = add("export", _export, "a saved model to compressed-tensors (vLLM) or ONNX (QDQ)",
             "Export DIR (pysparse.save) to the compressed-tensors layout (int8 channel-wise "
             "weights + scales; w4 pack-quantized) or to ONNX with int8 QDQ weights.")
    px.add_argument("dir", type=Path, metavar="DIR", help="a directory written by pysparse")
    px.add_argument("--to", choices=("compressed-tensors", "onnx"), required=True)
    px.add_argument("--out", type=Path, required=True, help="directory (or .onnx file)")
    px.add_argument("--strict", action="store_true",
                    help="(onnx) refuse layers with no int8 QDQ form instead of writing them as "
                         "float weights")

    pi = add("info", _info, "CPU ISA found, backends usable (and why not), versions; a saved "
             "model's contents")
    pi.add_argument("--model", type=Path, default=None, help="describe a pysparse directory")
    pi.add_argument("--layers", action="store_true", help="with --model: per-layer summary")

    pd = add("demo", _demo, "MiniLM under each scheme: bytes, latency, fidelity")
    pd.add_argument("--out", default="pysparse-demo", help="directory for demo.json / demo.png")
    pd.add_argument("--texts", type=int, default=256, help="texts for fidelity (>= 11)")
    pd.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    p = _parser()
    args = p.parse_args(argv)
    if getattr(args, "texts", 11) < 11:
        p.error("--texts must be at least 11 (recall@10 needs more than 10 neighbours)")
    for name in ("calib_n", "n", "batch_size", "max_length", "group_size", "distill_steps",
                 "share"):
        v = getattr(args, name, None)
        if v is not None and v <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {v}")
    from .io import FormatError
    from .models import ModelNotInstalled
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, TypeError, RuntimeError, OSError, ImportError, FormatError,
            ModelNotInstalled) as exc:
        if os.environ.get("PYSPARSE_DEBUG"):
            raise
        msg = str(exc)
        print(f"error: {msg if msg.startswith('pysparse') else 'pysparse ' + args.cmd + ': ' + msg}",
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
