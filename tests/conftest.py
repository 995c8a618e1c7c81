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


@pytest.fixture(scope="session")
def processor_dir(tmp_path_factory):
    """Tokenizer (the genuine Qwen2 one), chat template and preprocessor files of a Qwen2-VL-Instruct checkpoint."""
    from helpers import write_processor_files

    path = tmp_path_factory.mktemp("processor")
    write_processor_files(path)
    return path


@pytest.fixture(scope="session")
def processor(processor_dir):
    from qwen2vl.processing.processor import Processor

    return Processor.from_pretrained(processor_dir)


@pytest.fixture(scope="session")
def hf_processor(processor_dir):
    from helpers import hf_processor

    return hf_processor(processor_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_dir):
    """The tiny random checkpoint with the genuine tokenizer and processor files: a complete model directory."""
    from helpers import write_processor_files

    write_processor_files(tiny_dir[0])
    return tiny_dir[0]


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """A complete tiny model directory over a 272-token byte-level vocabulary (helpers.small_config): for the
    tests of serving, training and the CLI, which need a working tokenizer but not the genuine one, and whose
    checkpoints are then ~1 MB rather than ~160 MB."""
    from helpers import small_config, small_tokenizer_json

    from qwen2vl.processing.processor import save_processor_files

    path = tmp_path_factory.mktemp("small")
    make_reference(small_config(), path)
    save_processor_files(path, small_tokenizer_json())
    return path
