"""Training data: labels supervise exactly the assistant replies (chat) or all text (pretrain), never vision
tokens; both record formats; packed rows give the same loss and gradients as separate samples, and a sample's
loss equals transformers' on the same inputs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl.records import DataError, read_jsonl
from qwen2vl.train.data import IGNORE, encode, to_messages
from qwen2vl.train.packing import loss_sum, pack, plan_rows


def noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def supervised_text(sample, tok):
    """The supervised tokens, as runs of consecutive positions, decoded."""
    runs, current = [], []
    for i, label in zip(sample.input_ids.tolist(), sample.labels.tolist()):
        if label != IGNORE:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


CHAT = {"messages": [
    {"role": "user", "content": [{"type": "image", "image": None}, {"type": "text", "text": "What colour?"}]},
    {"role": "assistant", "content": "Red, mostly.\n\nAnd a bit of blue."},
    {"role": "user", "content": "Where is the blue?"},
    {"role": "assistant", "content": [{"type": "text", "text": "<|object_ref_start|>blue<|object_ref_end|>"
                                                              "<|box_start|>(10,20),(300,400)<|box_end|>"}]},
]}  # fmt: skip


def chat_record(image):
    record = json.loads(json.dumps(CHAT))
    record["messages"][0]["content"][0]["image"] = image
    return record


def test_chat_labels_are_the_replies_and_their_im_end(processor, tmp_path):
    noise(56, 56).save(tmp_path / "a.png")
    messages, kind = to_messages(chat_record("a.png"), root=tmp_path)
    sample = encode(messages, kind, processor)
    assert kind == "chat"
    assert supervised_text(sample, processor.tokenizer) == [
        "Red, mostly.\n\nAnd a bit of blue.<|im_end|>",
        "<|object_ref_start|>blue<|object_ref_end|><|box_start|>(10,20),(300,400)<|box_end|><|im_end|>",
    ]
    # the ids are exactly what inference tokenizes for the same conversation
    full = processor(messages, add_generation_prompt=False)["input_ids"][0]
    assert torch.equal(sample.input_ids, full)
    assert sample.image_grid_thw.tolist() == [[1, 4, 4]] and sample.pixel_values.shape == (16, 1176)


def test_pretrain_supervises_all_text_but_no_vision_token(processor, tmp_path):
    noise(56, 56).save(tmp_path / "a.png")
    record = {"type": "pretrain", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "A photo of"}, {"type": "image", "image": "a.png"},
        {"type": "text", "text": " a cat on a mat."}]}]}  # fmt: skip
    sample = encode(*to_messages(record, root=tmp_path), processor)
    # the first token is never supervised (nothing in the sample predicts it)
    assert supervised_text(sample, processor.tokenizer) == [" photo of", " a cat on a mat.<|endoftext|>"]
    vision = torch.isin(sample.input_ids, torch.tensor([151652, 151653, 151655]))
    assert vision.sum() == 4 + 2 and (sample.labels[vision] == IGNORE).all()


def test_sharegpt_records(processor, tmp_path):
    noise(56, 56).save(tmp_path / "a.png")
    noise(84, 56, 1).save(tmp_path / "b.png")
    record = {"conversations": [{"from": "human", "value": "<image>\nCompare with <image>."},
                                {"from": "gpt", "value": "Same."}], "images": ["a.png", "b.png"]}  # fmt: skip
    messages, kind = to_messages(record, root=tmp_path)
    assert kind == "chat" and [p["type"] for p in messages[0]["content"]] == ["image", "text", "image", "text"]
    sample = encode(messages, kind, processor)
    assert supervised_text(sample, processor.tokenizer) == ["Same.<|im_end|>"]
    assert sample.image_grid_thw.tolist() == [[1, 4, 4], [1, 4, 6]]
    with pytest.raises(DataError, match="2 images listed but 1 <image> placeholders"):
        to_messages({**record, "conversations": [{"from": "human", "value": "<image>"}]}, "line 3")
    with pytest.raises(DataError, match="more <image> placeholders than the 2 images"):
        to_messages({**record, "conversations": [{"from": "human", "value": "<image><image><image>"}]}, "line 3")


def test_bad_records(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n\n[1, 2]\n')
    lines = read_jsonl(tmp_path / "d.jsonl")
    assert next(lines)[0] == 1
    with pytest.raises(DataError, match=r"d.jsonl:3: a record is a JSON object"):
        next(lines)
    with pytest.raises(DataError, match="needs an assistant turn"):
        to_messages({"type": "chat", "messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(DataError, match="'messages' or 'conversations'"):
        to_messages({"text": "hi"})


def test_plan_rows():
    assert plan_rows([5, 3, 4, 2, 6], 8) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="over the row budget"):
        plan_rows([9], 8)


def samples(processor, tmp_path, **options):
    noise(56, 84).save(tmp_path / "a.png")
    records = [
        chat_record("a.png"),
        {"type": "pretrain", "messages": [{"role": "user", "content": "Just some text to continue."}]},
        {"messages": [{"role": "user", "content": [{"type": "video", "video": [noise(56, 56, i) for i in range(4)]},
                                                   {"type": "text", "text": "What happens?"}]},
                      {"role": "assistant", "content": "Noise flickers."}]},
    ]  # fmt: skip
    return [encode(*to_messages(r, root=tmp_path), processor, min_pixels=3136, **options) for r in records]


def test_packed_loss_and_gradients_equal_unpacked(tiny_checkpoint, processor, tmp_path):
    import qwen2vl

    model = qwen2vl.Qwen2VL.from_pretrained(tiny_checkpoint)
    batch = samples(processor, tmp_path)
    config = model.config

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    total, count = 0.0, 0
    for s in batch:
        loss, n = loss_sum(model, pack([s], config))
        total, count = total + loss, count + n
    separate = grads(total / count)
    loss, n = loss_sum(model, pack(batch, config))
    packed = grads(loss / n)
    assert n == count == sum(s.supervised for s in batch)
    assert abs((loss / n).item() - (total / count).item()) < 1e-5
    assert separate.keys() == packed.keys() and any("visual" in k for k in packed)
    for k in packed:
        assert torch.allclose(packed[k], separate[k], atol=1e-5, rtol=1e-4), k


def test_sample_loss_equals_transformers(tiny_checkpoint, tiny_ref, processor, tmp_path):
    from helpers import mm_token_type_ids

    import qwen2vl

    model = qwen2vl.Qwen2VL.from_pretrained(tiny_checkpoint)
    s = samples(processor, tmp_path)[0]
    loss, n = loss_sum(model, pack([s], model.config))
    with torch.no_grad():
        ref = tiny_ref(input_ids=s.input_ids[None], pixel_values=s.pixel_values, image_grid_thw=s.image_grid_thw,
                       labels=s.labels[None], mm_token_type_ids=mm_token_type_ids(s.input_ids[None])).loss  # fmt: skip
    assert abs((loss / n).item() - float(ref)) < 1e-5



def test_uint8_levels_pack_to_the_same_patches(tiny_checkpoint, processor, tmp_path):
    """Training holds media as uint8 levels; packed, they are exactly the float patches encode gives (an image
    and a video in one row), in at most a quarter of the memory."""
    from qwen2vl.config import Qwen2VLConfig

    config = Qwen2VLConfig.from_pretrained(tiny_checkpoint)
    full, compact = samples(processor, tmp_path), samples(processor, tmp_path, levels=True)
    a, b = pack(full, config), pack(compact, config)
    for key in ("pixel_values", "pixel_values_videos"):
        assert getattr(b, key).dtype == torch.float32 and torch.equal(getattr(a, key), getattr(b, key)), key
    keys = ("pixel_values", "pixel_values_videos")
    held = sum(getattr(s, k).numel() for s in compact for k in keys if getattr(s, k) is not None)  # bytes
    floats = sum(getattr(s, k).numel() * 4 for s in full for k in keys if getattr(s, k) is not None)
    assert 0 < held * 4 <= floats


def test_turn_weights_make_each_reply_weigh_one(tiny_checkpoint, processor, tmp_path):
    """With turn_weights, a reply's tokens share a weight of 1 (the 2-token "Same." and the 20-token box alike),
    ids and labels do not change, and the weighted loss is the mean over replies of each reply's token mean."""
    import qwen2vl

    plain, weighted = samples(processor, tmp_path), samples(processor, tmp_path, turn_weights=True)
    replies = [2, 1, 1]  # the chat record's two replies, the caption, the video's one reply
    for a, b, n in zip(plain, weighted, replies):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
        assert a.weights is None and a.weight == a.supervised
        supervised = b.labels != IGNORE
        assert (b.weights[~supervised] == 0).all() and (b.weights[supervised] > 0).all()
        assert b.weight == pytest.approx(n)
    chat = weighted[0]
    sizes = [len(processor.tokenizer.encode(t)) for t in supervised_text(chat, processor.tokenizer)]
    w = chat.weights[chat.labels != IGNORE]
    assert w[: sizes[0]].tolist() == pytest.approx([1 / sizes[0]] * sizes[0])
    assert w[sizes[0]:].tolist() == pytest.approx([1 / sizes[1]] * sizes[1]) and sizes[0] != sizes[1]

    model = qwen2vl.Qwen2VL.from_pretrained(tiny_checkpoint)
    row = pack(weighted, model.config)
    loss, n = loss_sum(model, row)
    assert n == pytest.approx(4)
    # by hand: every supervised token's cross-entropy, averaged within its reply, then over the four replies
    with torch.no_grad():
        h = model.hidden(row.input_ids, None, row.pixel_values, row.image_grid_thw, row.pixel_values_videos,
                         row.video_grid_thw, position_ids=row.position_ids, seqlens=row.seqlens)  # fmt: skip
        ce = torch.nn.functional.cross_entropy(model.lm_head(h[0, :-1]), row.labels[0, 1:].clamp(min=0),
                                               reduction="none")  # fmt: skip
    means, start = [], 0
    for s in weighted:  # reply boundaries: runs of consecutive supervised labels within each sample
        keep = (s.labels != IGNORE).nonzero().flatten()
        runs = torch.tensor_split(keep, (torch.diff(keep) > 1).nonzero().flatten() + 1)
        means += [ce[start + r - 1].mean() for r in runs]
        start += len(s)
    assert len(means) == 4
    assert (loss / n).item() == pytest.approx(torch.stack(means).mean().item(), rel=1e-5)
    # a row of unweighted samples keeps the token mean
    token_loss, count = loss_sum(model, pack(plain, model.config))
    assert count == sum(s.supervised for s in plain) and row.weights is not None
    assert pack(plain, model.config).weights is None
    assert abs(token_loss.item() / count - loss.item() / n) > 1e-4  # the two means differ on these samples
