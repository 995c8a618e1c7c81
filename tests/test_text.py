"""Tokenizer (the genuine Qwen2 one, built offline) and the chat template, against transformers."""

import pytest

from qwen2vl.processing.chat import OFFICIAL_TEMPLATE, ChatTemplate, render
from qwen2vl.processing.errors import MediaError
from qwen2vl.processing.tokenizer import IncrementalDecoder, Tokenizer

TEXTS = [
    "Hello world",
    "你好",
    "The quick brown fox's 12345 jumps!\n\n  over the lazy dog's back.\r\n",
    "日本語のテキスト、そして中文。Ünïcödé café, naïve (NFC: e\u0301).",
    "emoji 😀🎉👩‍👩‍👧 and math ∑ x² ≤ 3",
    "    def f(x):\n\treturn x**2  # comment\n\n\n",
    "<|im_start|>user\nhi<|im_end|>\n<|vision_start|><|image_pad|><|vision_end|>",
    "<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(12,34),(560,780)<|box_end|>",
]


def test_known_ids(processor):
    tok = processor.tokenizer
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("你好") == [108386]
    assert tok.encode("2024") == [17, 15, 17, 19]  # digits one by one
    assert len(tok) == 151657
    assert [tok.token_id(t) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>")] == [
        151643, 151645, 151655, 151656,
    ]  # fmt: skip
    assert tok.eos_id == 151645 and tok.pad_id == 151643


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_equal_transformers(processor, hf_processor, text):
    ours, ref = processor.tokenizer, hf_processor.tokenizer
    ids = ours.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False)
    assert ours.decode(ids, keep_grounding=False) == ref.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


def test_decode_keeps_grounding_markup_and_drops_control_tokens(processor):
    tok = processor.tokenizer
    ids = tok.encode("<|im_start|>assistant\n<|object_ref_start|>a dog<|object_ref_end|><|box_start|>(1,2),(3,4)"
                     "<|box_end|><|im_end|><|endoftext|>")  # fmt: skip
    assert tok.decode(ids) == "assistant\n<|object_ref_start|>a dog<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>"
    assert tok.decode(ids, keep_grounding=False) == "assistant\na dog(1,2),(3,4)"


@pytest.mark.parametrize("text", TEXTS[2:6])
def test_incremental_decoding_never_splits_a_character(processor, text):
    tok = processor.tokenizer
    ids = tok.encode(text)
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    if any(ord(c) > 0xFFFF for c in text):  # a 4-byte character spans several byte-level tokens
        assert "" in pieces[:-1]


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


IMG = {"type": "image", "image": "a.png"}
VID = {"type": "video", "video": "v.mp4"}
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": [IMG, VID, {"type": "text", "text": "Describe this image."}]}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": [IMG, {"type": "text", "text": "?"}]}],
    [
        {"role": "user", "content": [{"type": "text", "text": "Compare "}, IMG, {"type": "text", "text": " and "}, IMG]},
        {"role": "assistant", "content": [{"type": "text", "text": "The first is brighter."}]},
        {"role": "user", "content": [VID, {"type": "text", "text": "And the video?"}, IMG, VID]},
        {"role": "assistant", "content": "A cat runs."},
        {"role": "user", "content": [{"image_url": "http://x/y.png"}, {"type": "image", "url": "z.png"}]},
    ],
    [{"role": "system", "content": [{"type": "text", "text": "sys "}, {"type": "text", "text": "two parts"}]},
     {"role": "user", "content": []}],
]  # fmt: skip


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("add_vision_id", [False, True])
def test_chat_template_is_byte_identical(hf_processor, conversation, add_generation_prompt, add_vision_id):
    ref = hf_processor.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id
    )
    ours = render(conversation, add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id)
    assert ours == ref


def test_reference_rendering_of_the_notes():
    """REFERENCE §6: [image, video, "Describe this image."] with a generation prompt."""
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>Describe this image."
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render(CONVERSATIONS[1], add_generation_prompt=True) == expected
    assert "Picture 1: <|vision_start|>" in render(CONVERSATIONS[1], add_vision_id=True)
    assert "Video 1: <|vision_start|>" in render(CONVERSATIONS[1], add_vision_id=True)


def test_a_checkpoints_own_template_is_rendered_with_jinja(hf_processor):
    base = "{% for message in messages %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}" \
           "{% else %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}{% endfor %}{% endfor %}"  # fmt: skip
    conversation = [{"role": "user", "content": [IMG, {"type": "text", "text": "A photo of"}]}]
    ours = ChatTemplate(base)
    assert not ours.is_official and ChatTemplate(OFFICIAL_TEMPLATE).is_official
    assert ours(conversation) == hf_processor.apply_chat_template(conversation, chat_template=base, tokenize=False)


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"content": "no role"}], "string 'role'"),
        ([{"role": "user", "content": 5}], "string or a list of parts"),
        ([{"role": "user", "content": ["bare string"]}], "a content part is a dict"),
        ([{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}], "unknown content part type 'audio'"),
        ([{"role": "user", "content": [{"type": "image"}]}], "has no image data"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "'text' must be a string"),
    ],
)
def test_bad_messages_are_named(processor, messages, reason):
    with pytest.raises(MediaError, match=reason):
        processor.render(messages)
