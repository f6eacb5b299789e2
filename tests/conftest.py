import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import pysparse  # noqa: E402,F401  (registers the ops)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def minilm():
    models = pytest.importorskip("pysparse.models")
    try:
        return models.load_minilm()
    except models.ModelNotInstalled as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def texts():
    from pysparse.data import load_descriptions
    return load_descriptions(200, seed=1)
