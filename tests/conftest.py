import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import qwen2vl  # noqa: E402
from helpers import make_reference  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random-init transformers model of the tiny config, saved in the hub layout."""
    path = tmp_path_factory.mktemp("tiny")
    ref = make_reference(qwen2vl.tiny(), path)
    return path, ref


@pytest.fixture(scope="session")
def tiny_ref(tiny_dir):
    return tiny_dir[1]


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    return qwen2vl.Qwen2VL.from_pretrained(tiny_dir[0])
