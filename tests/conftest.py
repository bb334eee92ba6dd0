"""Test set-up: never touch the network, make torch deterministic, and share tiny-model builders."""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny Llama saved as a model folder and a corpus of 60 documents: what the sweep tests run on, built once."""
    import tiny

    root = tmp_path_factory.mktemp("tiny-llama")
    return tiny.save(tiny.causal_lm("llama"), "causal", root / "model"), tiny.write_corpus(root / "corpus.txt", 60)
