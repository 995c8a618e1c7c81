"""M-RoPE position ids: the worked examples of REFERENCE §11 (items 6-10) and transformers' get_rope_index."""

import pytest
import torch

import qwen2vl
from helpers import IMG, VE, VID, VS, left_pad, mm_token_type_ids, prompt
from qwen2vl.model.rope import mrope_cos_sin, vision_position_ids
from qwen2vl.positions import PlaceholderError, mrope_positions

T = 7  # any text token


def test_vision_ids_follow_2x2_windows():
    hw = vision_position_ids([(1, 4, 4)], merge=2)
    assert hw[:, 0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    assert hw[:, 1].tolist() == [0, 1, 0, 1, 2, 3, 2, 3, 0, 1, 0, 1, 2, 3, 2, 3]


def test_worked_example_item7():
    ids, ig, vg = prompt(T, T, ("image", 1, 4, 6), T, ("video", 2, 4, 4), T, T)
    pos, delta = mrope_positions(torch.tensor([ids]), ig, vg)
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 12, 13]
    assert pos[1, 0].tolist() == [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8, 9, 9, 10, 10, 9, 9, 10, 10, 11, 12, 13]
    assert pos[2, 0].tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10, 9, 10, 9, 10, 9, 10, 11, 12, 13]
    assert delta.tolist() == [14 - 23]


def test_one_224_image_delta():
    ids, ig, _ = prompt(("image", 1, 16, 16))
    _, delta = mrope_positions(torch.tensor([ids]), ig)
    assert delta.tolist() == [-56]


def test_long_video_item8_both_rules():
    ids, _, vg = prompt(T, ("video", 10, 4, 4), T, T)  # [T, VS, VID x40, VE, T, T]
    ids = torch.tensor([ids])
    pos, delta = mrope_positions(ids, None, vg)
    assert pos[:, 0, -3:].tolist() == [[12, 13, 14]] * 3 and delta.tolist() == [-30]
    pos, delta = mrope_positions(ids, None, vg, hf5_compat=True)
    assert pos[:, 0, -3:].tolist() == [[4, 5, 6]] * 3 and delta.tolist() == [-33]


def test_left_padding_and_decode_item9():
    seq0 = [11, 12, VS] + [IMG] * 6 + [VE, 13]
    seq1 = [VS] + [IMG] * 4 + [VE, 13]
    ids, mask = left_pad([seq0, seq1])
    grid = torch.tensor([[1, 4, 6], [1, 4, 4]])
    pos, delta = mrope_positions(ids, grid, None, mask)
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7]
    assert pos[0, 1].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 3, 4]
    assert pos[1, 0].tolist() == [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7]
    assert pos[2, 0].tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7]
    assert delta.tolist() == [-3, -2]
    first = mask.sum(-1) + delta  # the token after each prompt: its real tokens + delta
    assert first.tolist() == [8, 5]
    assert (first + 1).tolist() == [9, 6]


def test_decode_positions_inside_the_model(tiny):
    """The cache's next_position after prefill is the item-9 value, then +1 per step."""
    from qwen2vl.model.cache import KVCache
    from qwen2vl.model.qwen2vl import Media

    seq0 = [11, 12, VS] + [IMG] * 6 + [VE, 13]
    seq1 = [VS] + [IMG] * 4 + [VE, 13]
    ids, mask = left_pad([seq0, seq1])
    grid = torch.tensor([[1, 4, 6], [1, 4, 4]])
    pv = torch.randn(40, 1176)
    cache = KVCache.allocate(tiny.config.text, 2, 16, torch.float32, "cpu")
    with torch.no_grad():
        logits, cache = tiny.prefill(ids, cache, mask, Media(pv, grid))
        assert cache.next_position.tolist() == [8, 5]
        _, cache = tiny.decode(logits.argmax(-1), cache)
    assert cache.next_position.tolist() == [9, 6] and cache.length == 12


def test_text_only_is_plain_rope():
    """Item 10: equal rows make M-RoPE the standard 1D RoPE (theta 1e6, dim 128)."""
    pos = torch.arange(50).view(1, 1, -1).expand(3, 1, -1)
    cos, sin = mrope_cos_sin(pos, 128, 1e6, (16, 24, 24), torch.float32)
    inv = 1.0 / 1e6 ** (torch.arange(0, 128, 2).float() / 128)
    ang = torch.arange(50).float()[:, None] * inv
    ang = torch.cat([ang, ang], -1)
    assert torch.allclose(cos[0], ang.cos()) and torch.allclose(sin[0], ang.sin())
    ids = torch.tensor([[5] * 9])
    p, d = mrope_positions(ids)
    assert p[:, 0].tolist() == [list(range(9))] * 3 and d.tolist() == [0]


def _random_batch(g: torch.Generator, compat_safe: bool):
    rows, images, videos = [], [], []
    for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
        parts = []
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
            r = int(torch.randint(0, 3, (1,), generator=g))
            h, w = (int(x) * 2 for x in torch.randint(1, 5, (2,), generator=g))
            if r == 0:
                parts += [T] * int(torch.randint(1, 4, (1,), generator=g))
            elif r == 1:
                parts.append(("image", 1, h, w))
            else:
                t = int(torch.randint(1, max(h, w) // 2 + 1 if compat_safe else 9, (1,), generator=g))
                parts.append(("video", t, h, w))
        ids, ig, vg = prompt(T, *parts)
        rows.append(ids)
        images += [] if ig is None else ig.tolist()
        videos += [] if vg is None else vg.tolist()
    ids, mask = left_pad(rows)
    grid = lambda x: torch.tensor(x) if x else None  # noqa: E731
    return ids, mask, grid(images), grid(videos)


@pytest.mark.parametrize("seed", range(12))
def test_matches_transformers_get_rope_index(tiny_ref, seed):
    """Random batches of text, images and videos (left padded) against transformers 5.24, whose rule
    equals ours with hf5_compat always, and without it whenever t <= max(h/2, w/2)."""
    g = torch.Generator().manual_seed(seed)
    ids, mask, ig, vg = _random_batch(g, compat_safe=seed % 2 == 0)
    ref_pos, ref_delta = tiny_ref.model.get_rope_index(ids, mm_token_type_ids(ids), ig, vg, attention_mask=mask)
    pos, delta = mrope_positions(ids, ig, vg, mask, hf5_compat=True)
    assert torch.equal(pos, ref_pos) and delta.tolist() == ref_delta.flatten().tolist()
    if seed % 2 == 0:
        pos, delta = mrope_positions(ids, ig, vg, mask)
        assert torch.equal(pos, ref_pos) and delta.tolist() == ref_delta.flatten().tolist()


def test_placeholder_errors_name_the_counts():
    ids, ig, _ = prompt(T, ("image", 1, 4, 4), T)
    short = torch.tensor([ids[:3] + ids[4:]])  # one image token cut out
    with pytest.raises(PlaceholderError, match="needs 4 consecutive image tokens but input_ids have 3"):
        mrope_positions(short, ig)
    with pytest.raises(PlaceholderError, match="more image blocks than image_grid_thw rows"):
        mrope_positions(torch.tensor([ids + ids]), ig)
    with pytest.raises(PlaceholderError, match="1 more row"):
        mrope_positions(torch.tensor([ids]), torch.cat([ig, ig]))


def test_model_reports_feature_count_mismatch(tiny):
    ids, ig, _ = prompt(T, ("image", 1, 4, 4), T)
    ids = torch.tensor([ids[:3] + ids[4:]])
    with pytest.raises(qwen2vl.PlaceholderError, match="input_ids hold 3 image tokens.*gives 4 features"):
        tiny(ids, None, torch.randn(16, 1176), ig)
    with pytest.raises(qwen2vl.PlaceholderError, match="no video pixels"):
        tiny(torch.tensor([[T, VID, VID]]))
