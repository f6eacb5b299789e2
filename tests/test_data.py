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
