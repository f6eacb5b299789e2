#!/usr/bin/env python3
"""Build the bundled Debian package-description text data set.

Produces ``pysparse/data/debian_descriptions.jsonl.gz``: a gzip'd JSON-lines
file with one ``{"package": ..., "section": ..., "text": ...}`` object per
line.  The texts are Debian package descriptions (synopsis + long
description), used by pysparse as short, real English/technical text for
embedding-fidelity checks and as a section-classification task.

Source: the package metadata of the Debian archive, as seen by apt on the
build machine (``apt-cache dumpavail``).  On current Debian releases the
``Packages`` indices only carry the one-line synopsis; the long English
descriptions live in the ``Translation-en`` indices, which are matched to the
packages by ``Description-md5``.  Docker images usually disable those
(``Acquire::Languages "none"``), so fetch them first::

    apt-get update -o Acquire::Languages=en
    python3 bench/data/build_debian_text.py

The script only uses the Python standard library and is deterministic: the
same inputs and options give a byte-identical output file (gzip mtime=0, no
file name in the gzip header, sorted output, fixed random seed).

Pipeline
--------
1. parse the ``apt-cache dumpavail`` stanzas (Package, Section, Description,
   Description-md5, Filename); records without ``Filename`` (installed-only
   packages not available from any configured archive) are skipped;
2. take the long description from the stanza itself when present, otherwise
   from the Translation-en index (by Description-md5);
3. skip packages named ``*-dbg``, ``*-dbgsym``, ``*-doc``;
4. clean: synopsis + ". " + long description on one line, paragraph marks
   (" .") removed, whitespace collapsed; drop long descriptions shorter than
   ``--min-long-chars`` (80) characters;
5. dedupe: packages are visited in name order and a package is dropped when
   its text -- or its long description alone (e.g. ``libfoo1``/``libfoo-dev``
   pairs that differ only in the synopsis) -- was already seen;
6. strip ``contrib/``, ``non-free/``, ``non-free-firmware/`` from Section and
   keep sections with at least ``--min-section`` (40) candidate packages;
7. stratified deterministic sample: an equal quota per section (capped by
   ``--per-section`` and by the section's size) chosen so the total is
   ``--target`` records (or all candidates if fewer), then
   ``random.Random(seed).sample`` within each section;
8. truncate texts to ``--max-chars`` (1000) at a word boundary and write the
   records sorted by package name.
"""

from __future__ import annotations

import argparse
import bz2
import collections
import glob
import gzip
import io
import json
import lzma
import os
import random
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "pysparse" / "data" / "debian_descriptions.jsonl.gz"
APT_LISTS = "/var/lib/apt/lists"
APT_HELPER = "/usr/lib/apt/apt-helper"

SKIP_SUFFIXES = ("-dbg", "-dbgsym", "-doc")
SECTION_PREFIXES = ("contrib/", "non-free-firmware/", "non-free/")
_WS = re.compile(r"\s+")


# --------------------------------------------------------------------------
# Reading inputs
# --------------------------------------------------------------------------
def run_dumpavail() -> str:
    """Return the output of ``apt-cache dumpavail`` as text."""
    env = dict(os.environ, LC_ALL="C.UTF-8")
    proc = subprocess.run(
        ["apt-cache", "dumpavail"],
        check=True,
        stdout=subprocess.PIPE,
        env=env,
    )
    return proc.stdout.decode("utf-8", errors="replace")


def read_index_file(path: str) -> str:
    """Read a (possibly compressed) apt index file as text."""
    opener = {
        ".gz": gzip.open,
        ".xz": lzma.open,
        ".lzma": lzma.open,
        ".bz2": bz2.open,
    }.get(os.path.splitext(path)[1])
    if opener is not None:
        with opener(path, "rb") as fh:
            data = fh.read()
    elif path.endswith((".lz4", ".zst")):
        # No stdlib codec: let apt decompress it.
        data = subprocess.run(
            [APT_HELPER, "cat-file", path], check=True, stdout=subprocess.PIPE
        ).stdout
    else:
        with open(path, "rb") as fh:
            data = fh.read()
    return data.decode("utf-8", errors="replace")


def default_translation_files() -> list[str]:
    """English translation indices downloaded by apt, in sorted order."""
    return sorted(glob.glob(os.path.join(APT_LISTS, "*_i18n_Translation-en*")))


def iter_stanzas(text: str):
    """Yield deb822 stanzas as ``{field: [first_line, continuation...]}``.

    Field names are kept as written; continuation lines keep their leading
    space so callers can tell " ." paragraph marks apart.
    """
    fields: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if not line.strip():
            if fields:
                yield fields
            fields, current = {}, None
        elif line[0] in " \t":
            if current is not None:
                current.append(line)
        else:
            name, sep, value = line.partition(":")
            if not sep:
                current = None
                continue
            current = [value.strip()]
            fields.setdefault(name.strip(), current)
    if fields:
        yield fields


def load_translations(paths: list[str]) -> dict[str, list[str]]:
    """Map Description-md5 -> long-description continuation lines."""
    out: dict[str, list[str]] = {}
    for path in paths:
        for st in iter_stanzas(read_index_file(path)):
            md5 = st.get("Description-md5", [""])[0]
            desc = st.get("Description-en")
            if md5 and desc and md5 not in out:
                out[md5] = desc[1:]
    return out


# --------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------
def collapse(s: str) -> str:
    return _WS.sub(" ", s).strip()


def clean_long(lines: list[str]) -> str:
    """Join continuation lines into one line; " ." marks become spaces."""
    parts = []
    for line in lines:
        s = line.strip()
        if s == ".":
            continue  # paragraph break
        parts.append(s)
    return collapse(" ".join(parts))


def join_text(synopsis: str, long: str) -> str:
    synopsis = collapse(synopsis)
    sep = " " if synopsis.endswith((".", "!", "?", ":")) else ". "
    return synopsis + sep + long


def truncate_words(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars + 1]
    space = cut.rfind(" ")
    if space <= 0:
        return text[:max_chars]
    return cut[:space].rstrip()


def clean_section(section: str) -> str:
    for prefix in SECTION_PREFIXES:
        if section.startswith(prefix):
            return section[len(prefix):]
    return section


# --------------------------------------------------------------------------
# Main pipeline
# --------------------------------------------------------------------------
def collect(dump_text: str, translations: dict[str, list[str]], min_long: int):
    """Return (candidates, stats); candidates are dicts sorted by package."""
    stats = collections.Counter()
    records = {}
    for st in iter_stanzas(dump_text):
        pkg = st.get("Package", [""])[0]
        if not pkg:
            continue
        stats["stanzas"] += 1
        if "Filename" not in st:
            stats["skip_no_filename"] += 1
            continue
        if pkg in records:  # dumpavail lists one version per package
            stats["skip_duplicate_name"] += 1
            continue
        records[pkg] = st

    candidates = []
    seen_texts: set[str] = set()
    seen_long: set[str] = set()
    for pkg in sorted(records):
        st = records[pkg]
        if pkg.endswith(SKIP_SUFFIXES):
            stats["skip_suffix"] += 1
            continue
        desc = st.get("Description") or st.get("Description-en")
        section = clean_section(st.get("Section", [""])[0])
        if not desc or not section:
            stats["skip_no_description_or_section"] += 1
            continue
        long_lines = desc[1:]
        if not long_lines:
            md5 = st.get("Description-md5", [""])[0]
            long_lines = translations.get(md5, [])
        long = clean_long(long_lines)
        if len(long) < min_long:
            stats["skip_short"] += 1
            continue
        text = join_text(desc[0], long)
        if text in seen_texts or long in seen_long:
            stats["skip_duplicate_text"] += 1
            continue
        seen_texts.add(text)
        seen_long.add(long)
        candidates.append({"package": pkg, "section": section, "text": text})
    stats["candidates"] = len(candidates)
    return candidates, stats


def allocate(sizes: dict[str, int], per_section: int, target: int) -> dict[str, int]:
    """Equal per-section quota (water-filling), capped, summing to <= target."""
    caps = {s: min(n, per_section) for s, n in sizes.items()}
    if sum(caps.values()) <= target:
        return caps
    q = 0
    while sum(min(c, q + 1) for c in caps.values()) <= target:
        q += 1
    alloc = {s: min(c, q) for s, c in caps.items()}
    left = target - sum(alloc.values())
    for s in sorted(caps):  # hand out the remainder in name order
        if left <= 0:
            break
        if alloc[s] < caps[s]:
            alloc[s] += 1
            left -= 1
    return alloc


def sample(candidates, *, per_section, target, min_section, seed, max_chars):
    by_section: dict[str, list[dict]] = collections.defaultdict(list)
    for rec in candidates:
        by_section[rec["section"]].append(rec)
    kept = {s: recs for s, recs in by_section.items() if len(recs) >= min_section}
    alloc = allocate({s: len(r) for s, r in kept.items()}, per_section, target)
    rng = random.Random(seed)
    chosen = []
    for s in sorted(kept):
        recs = sorted(kept[s], key=lambda r: r["package"])
        chosen.extend(rng.sample(recs, alloc[s]))
    chosen.sort(key=lambda r: r["package"])
    out = [
        {
            "package": r["package"],
            "section": r["section"],
            "text": truncate_words(r["text"], max_chars),
        }
        for r in chosen
    ]
    dropped_sections = {s: len(r) for s, r in by_section.items() if s not in kept}
    return out, dropped_sections


def write_jsonl_gz(records, path: Path) -> int:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        for rec in records:
            line = json.dumps(rec, ensure_ascii=False, separators=(", ", ": "))
            gz.write(line.encode("utf-8") + b"\n")
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return len(data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="output .jsonl.gz path (default: %(default)s)")
    ap.add_argument("--per-section", type=int, default=120,
                    help="max records per section (default: %(default)s)")
    ap.add_argument("--target", type=int, default=4000,
                    help="total records to sample (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    ap.add_argument("--input", type=Path, default=None,
                    help="saved `apt-cache dumpavail` output to read instead of running apt-cache")
    ap.add_argument("--translations", action="append", default=None, metavar="FILE",
                    help="Translation-en index (plain, .gz, .xz, .bz2, or .lz4 via apt-helper); "
                         "repeatable; default: %s/*_i18n_Translation-en*" % APT_LISTS)
    ap.add_argument("--no-translations", action="store_true",
                    help="only use long descriptions present in the dumpavail stanzas")
    ap.add_argument("--min-section", type=int, default=40,
                    help="drop sections with fewer candidate packages (default: %(default)s)")
    ap.add_argument("--min-long-chars", type=int, default=80,
                    help="drop packages whose long description is shorter (default: %(default)s)")
    ap.add_argument("--max-chars", type=int, default=1000,
                    help="truncate texts at a word boundary to this length (default: %(default)s)")
    ap.add_argument("--max-bytes", type=int, default=2_000_000,
                    help="fail if the output file is larger (default: %(default)s)")
    ap.add_argument("--exclude", action="append", default=[], type=Path, metavar="JSONL_GZ",
                    help="leave out the packages of this data file (repeatable): builds a "
                         "corpus disjoint from it, e.g. the distillation texts")
    args = ap.parse_args(argv)

    dump_text = args.input.read_text("utf-8", errors="replace") if args.input else run_dumpavail()
    if args.no_translations:
        tr_files: list[str] = []
    elif args.translations is not None:
        tr_files = list(args.translations)
    else:
        tr_files = default_translation_files()
    translations = load_translations(tr_files)

    candidates, stats = collect(dump_text, translations, args.min_long_chars)
    if args.exclude:
        taken = set()
        for path in args.exclude:
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                taken |= {json.loads(line)["package"] for line in fh if line.strip()}
        before = len(candidates)
        candidates = [c for c in candidates if c["package"] not in taken]
        stats["skip_excluded"] = before - len(candidates)
    records, dropped = sample(
        candidates,
        per_section=args.per_section,
        target=args.target,
        min_section=args.min_section,
        seed=args.seed,
        max_chars=args.max_chars,
    )
    if not records:
        print("error: no records (are the Translation-en indices present? "
              "run `apt-get update -o Acquire::Languages=en`)", file=sys.stderr)
        return 1
    nbytes = write_jsonl_gz(records, args.out)

    counts = collections.Counter(r["section"] for r in records)
    lengths = sorted(len(r["text"]) for r in records)
    print(f"input: {'%s' % args.input if args.input else 'apt-cache dumpavail'}; "
          f"translation files: {len(tr_files)} ({len(translations)} descriptions)")
    print("filter:", ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    print(f"dropped sections (< {args.min_section} candidates): "
          + (", ".join(f"{s}={n}" for s, n in sorted(dropped.items())) or "none"))
    print(f"records: {len(records)}")
    print(f"sections: {len(counts)}")
    print("per-section: " + ", ".join(f"{s}={n}" for s, n in sorted(counts.items())))
    print(f"text chars: min={lengths[0]} median={lengths[len(lengths) // 2]} "
          f"max={lengths[-1]} total={sum(lengths)}")
    print(f"bytes: {nbytes} ({args.out})")
    if nbytes > args.max_bytes:
        print(f"error: output is {nbytes} bytes > --max-bytes {args.max_bytes}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
