"""qwen2vl.load(...).chat/stream on a tiny random checkpoint with the genuine tokenizer: the answer's tokens equal
transformers' greedy generate on transformers' processor output; stop strings; streaming; hub ids offline."""

import numpy as np
import pytest
import torch
from PIL import Image

import qwen2vl
from helpers import hf_processor as make_hf_processor
from qwen2vl.processing.tokenizer import _stop_prefix


@pytest.fixture(scope="module")
def assistant(tiny_checkpoint):
    return qwen2vl.load(tiny_checkpoint)


def conversation():
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (120, 90, 3), dtype=np.uint8))
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}]


def reference_answer(tiny_checkpoint, tiny_ref, n):
    hf = make_hf_processor(tiny_checkpoint)
    inputs = hf.apply_chat_template(
        conversation(), tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = tiny_ref.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=[151645, 151643])
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_chat_equals_transformers_greedy(assistant, tiny_checkpoint, tiny_ref):
    n = 24
    ref_ids = reference_answer(tiny_checkpoint, tiny_ref, n)
    eos = [i for i, t in enumerate(ref_ids) if t in (151645, 151643)]
    ref_ids = ref_ids[: eos[0]] if eos else ref_ids
    answer = assistant.chat(conversation(), max_new_tokens=n)
    assert answer == assistant.processor.tokenizer.decode(ref_ids)
    assert len(answer) > 0


def test_stream_pieces_join_to_the_answer(assistant):
    pieces = list(assistant.stream(conversation(), max_new_tokens=24))
    assert "".join(pieces) == assistant.chat(conversation(), max_new_tokens=24)
    assert len(pieces) > 1 and all(pieces)


def test_stop_strings_end_the_answer(assistant):
    full = assistant.chat(conversation(), max_new_tokens=24)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full[: full.index(stop)]
    assert assistant.chat(conversation(), max_new_tokens=24, stop=stop) == cut
    assert "".join(assistant.stream(conversation(), max_new_tokens=24, stop=[stop, "\x00never"])) == cut
    assert assistant.chat(conversation(), max_new_tokens=24, stop="\x00never") == full


def test_held_back_text_is_a_stop_prefix():
    assert _stop_prefix("hello wor", ["world"]) == 3
    assert _stop_prefix("hello", ["xyz"]) == 0
    assert _stop_prefix("ab", ["abc", "bcd"]) == 2


def test_sampling_is_seeded(assistant):
    a = assistant.chat(conversation(), max_new_tokens=12, temperature=1.0, seed=7)
    b = assistant.chat(conversation(), max_new_tokens=12, temperature=1.0, seed=7)
    c = assistant.chat(conversation(), max_new_tokens=12, temperature=1.0, seed=8)
    assert a == b and a != c


def test_a_string_is_one_user_turn(assistant):
    assert assistant.chat("Hi", max_new_tokens=4) == assistant.chat(
        [{"role": "user", "content": "Hi"}], max_new_tokens=4
    )


def test_hub_id_offline_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="could not be fetched from the Hugging Face hub"):
        qwen2vl.load("Qwen/Qwen2-VL-2B-Instruct")
    with pytest.raises(ValueError, match="no such directory"):
        qwen2vl.load(str(tmp_path / "nothing here"))
