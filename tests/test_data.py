import pytest

from pysparse.data import load_descriptions, section_names


def test_bundled_descriptions():
    texts = load_descriptions()
    assert len(texts) >= 1000
    assert all(isinstance(t, str) and 50 < len(t) <= 1000 for t in texts)
    assert load_descriptions(10, seed=3) == load_descriptions(10, seed=3)
    assert load_descriptions(10, seed=3) != load_descriptions(10, seed=4)
    pairs = load_descriptions(5, sections=True)
    assert all(sec in section_names() for _, sec in pairs)
    assert len(section_names()) >= 20


def test_bad_counts():
    with pytest.raises(ValueError):
        load_descriptions(0)
    with pytest.raises(ValueError):
        load_descriptions(10 ** 7)


def test_distill_corpus_is_disjoint_from_the_evaluation_texts():
    import gzip
    import json

    from pysparse.data import DATA_FILE, DISTILL_FILE, load_distill_descriptions
    from pysparse.pipeline import default_texts

    def packages(path):
        with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as fh:
            return [json.loads(line)["package"] for line in fh if line.strip()]

    extra = load_distill_descriptions()
    assert len(extra) == 8000 and all(50 < len(t) <= 1000 for t in extra)
    assert load_distill_descriptions(seed=1) != extra
    assert sorted(load_distill_descriptions(seed=1)) == sorted(extra)
    assert not set(packages(DATA_FILE)) & set(packages(DISTILL_FILE))
    pairs = load_distill_descriptions(sections=True)
    assert {s for _, s in pairs} <= set(section_names())
    train, ev, cal = (default_texts(k, None) for k in ("train", "eval", "calib"))
    assert len(train) == 11232 and not set(train) & (set(ev) | set(cal))
