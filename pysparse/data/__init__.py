"""Small bundled text data sets for pysparse evaluations.

``debian_descriptions.jsonl.gz`` holds ~4000 Debian package descriptions
(one-line synopsis + long description, cleaned to a single line, at most 1000
characters), each labelled with its Debian archive section (``python``,
``games``, ``libdevel``, ... -- 52 sections).  They serve as short, real
English/technical text for embedding-fidelity checks and as a
section-classification task.

Origin: Debian package metadata (Debian 12 "bookworm", ``main``), read with
``apt-cache dumpavail`` with the long English descriptions taken from the
archive's ``Translation-en`` index; built by ``bench/data/build_debian_text.py``
(see ``bench/data/README.md``).  Licence: the descriptions are part of
Debian's package metadata; each package's description comes from that
package, which is under its own licence.

Each record is ``{"package": str, "section": str, "text": str}``.

``debian_distill.jsonl.gz`` holds 8000 more descriptions of the same origin and format, of
packages *not* in the first file (``build_debian_text.py --exclude``, 48 sections, up to 189
per section): training text for distillation (``load_distill_descriptions``), so the
evaluation texts stay unseen and the student does not see the same few thousand texts
again and again.
"""

from __future__ import annotations

import functools
import gzip
import json
import operator
import random
from importlib import resources
from pathlib import Path

__all__ = ["DATA_FILE", "DISTILL_FILE", "load_descriptions", "load_distill_descriptions",
           "section_names"]

_FILENAME = "debian_descriptions.jsonl.gz"
_DISTILL_FILENAME = "debian_distill.jsonl.gz"


def _data_file(name=_FILENAME):
    # importlib.resources works from an installed wheel (and zip imports);
    # fall back to this file's directory when the module was loaded outside
    # of a package (e.g. via importlib from a file path).
    if __package__:
        try:
            return resources.files(__package__) / name
        except (ModuleNotFoundError, TypeError):
            pass
    return Path(__file__).resolve().parent / name


#: Location of the bundled data file (a ``pathlib.Path`` for ordinary
#: installs; an ``importlib.resources`` Traversable in general).
DATA_FILE = _data_file()
DISTILL_FILE = _data_file(_DISTILL_FILENAME)


@functools.lru_cache(maxsize=2)
def _records(path=None) -> tuple[tuple[str, str], ...]:
    """All (text, section) records of a bundled file (default DATA_FILE) in file order."""
    out = []
    with (path or DATA_FILE).open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                out.append((rec["text"], rec["section"]))
    return tuple(out)


def load_descriptions(
    n: int | None = None, *, seed: int = 0, sections: bool = False
) -> list[str] | list[tuple[str, str]]:
    """Return Debian package descriptions from the bundled data set.

    The records are shuffled deterministically with ``random.Random(seed)``
    and the first ``n`` are returned (all of them when ``n`` is None).

    Args:
        n: number of records; None for all. Must be a positive integer no
            larger than the number of bundled records.
        seed: shuffle seed; the same seed always gives the same order.
        sections: if True return ``(text, section)`` pairs instead of texts.

    Returns:
        ``list[str]`` of texts, or ``list[tuple[str, str]]`` of
        ``(text, section)`` pairs when ``sections=True``.

    Raises:
        ValueError: if ``n`` is not positive or exceeds the available records.
        TypeError: if ``n`` is not an integer (or None).

    The texts are Debian package descriptions (Debian package metadata via
    ``apt-cache dumpavail``; each package's description is under that
    package's licence), used as short real English/technical text for
    embedding-fidelity checks and a section-classification task.
    """
    records = _records()
    total = len(records)
    if n is not None:
        if isinstance(n, bool):
            raise TypeError(f"n must be an integer or None, got {n!r}")
        n = operator.index(n)  # TypeError for non-integers
        if n <= 0:
            raise ValueError(f"n must be a positive integer or None, got {n}")
        if n > total:
            raise ValueError(
                f"requested n={n} descriptions but the bundled data set "
                f"({_FILENAME}) only has {total}"
            )
    order = list(range(total))
    random.Random(seed).shuffle(order)
    if n is not None:
        order = order[:n]
    if sections:
        return [records[i] for i in order]
    return [records[i][0] for i in order]


def load_distill_descriptions(*, seed: int = 0, sections: bool = False):
    """The 8000 distillation texts (``debian_distill.jsonl.gz``: packages disjoint from
    ``load_descriptions``'), shuffled with ``random.Random(seed)``; ``(text, section)`` pairs
    when ``sections=True``."""
    records = list(_records(DISTILL_FILE))
    random.Random(seed).shuffle(records)
    return records if sections else [t for t, _ in records]


def section_names() -> list[str]:
    """Sorted unique Debian section names present in the data set."""
    return sorted({section for _, section in _records()})
