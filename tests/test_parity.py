"""Numbers against transformers 5.24 on random-init tiny checkpoints loaded through our own loader."""

import pytest
import torch

from helpers import left_pad, mm_token_type_ids, pixels, prompt, ref_logits

PATCH = 1176
S, E = 151644, 151645  # <|im_start|>, <|im_end|>

CASES = {
    "text": (11, 12, 13, 14, 15, 16, 17),
    "odd_image": (11, ("image", 1, 6, 10), 12, 13),  # 84x140 px: not square, not a power of two
    "images_of_different_sizes": (11, ("image", 1, 4, 4), 12, ("image", 1, 8, 6), ("image", 1, 2, 12), 13),
    "video": (11, ("video", 2, 4, 6), 12, 13),  # t <= max(h/2, w/2): paper rule == transformers 5.x
    "image_and_video": (11, ("image", 1, 4, 6), 12, ("video", 3, 6, 8), 14, 15),
    # ChatML shape: system, user (image), assistant, user (image + video), generation prompt
    "multi_turn": (
        *(S, 8948, 198, 2610, E, 198),
        *(S, 872, 198, ("image", 1, 6, 4), 3838, 30, E, 198),
        *(S, 77091, 198, 32, 4719, 13, E, 198),
        *(S, 872, 198, ("image", 1, 4, 8), ("video", 2, 4, 4), 3838, 30, E, 198),
        *(S, 77091, 198),
    ),
}


def run_both(model, ref, ids, mask=None, ig=None, vg=None, seed=1):
    pv, pvv = pixels(ig, PATCH, seed), pixels(vg, PATCH, seed + 1)
    r = ref_logits(ref, ids, mask, pv, ig, pvv, vg)
    with torch.no_grad():
        o = model(ids, mask, pv, ig, pvv, vg)
    return o, r


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(tiny, tiny_ref, case):
    ids, ig, vg = prompt(*CASES[case])
    ids = torch.tensor([ids])
    o, r = run_both(tiny, tiny_ref, ids, None, ig, vg)
    assert o.shape == r.shape == (1, ids.shape[1], tiny.config.text.vocab_size)
    assert (o - r).abs().max() < 1e-4


def test_batch_left_padded_mixed_media(tiny, tiny_ref):
    rows = [
        prompt(11, ("image", 1, 4, 6), 12, 13, 14, 15, 16),
        prompt(21, 22),  # text only, heavily padded
        prompt(("video", 2, 4, 4), 31, ("image", 1, 6, 4), 32),
    ]
    ids, mask = left_pad([r[0] for r in rows])
    ig = torch.cat([r[1] for r in rows if r[1] is not None])
    vg = torch.cat([r[2] for r in rows if r[2] is not None])
    o, r = run_both(tiny, tiny_ref, ids, mask, ig, vg)
    real = mask.bool()
    assert (o[real] - r[real]).abs().max() < 1e-4
    assert torch.isfinite(o).all()  # padding slots too: no NaN from all-masked rows


def test_vision_tower_matches(tiny, tiny_ref):
    grid = torch.tensor([[1, 6, 10], [3, 4, 4], [1, 16, 2]])
    pv = pixels(grid, PATCH)
    with torch.no_grad():
        r = tiny_ref.model.visual(pv, grid_thw=grid).pooler_output
        o = tiny.visual(pv, grid)
    assert o.shape == r.shape == (int(grid.prod(-1).sum()) // 4, tiny.config.text.hidden_size)
    assert (o - r).abs().max() < 1e-5


def test_long_video_paper_rule_and_hf5_compat(tiny_dir, tiny_ref):
    """t = 6 temporal patches > max(h/2, w/2) = 2: transformers 5.x places the text after the video
    differently (REFERENCE §3.3). Default = paper rule (differs from 5.24), hf5_compat = 5.24."""
    import qwen2vl

    ids, ig, vg = prompt(11, ("video", 6, 4, 4), 12, 13)
    ids = torch.tensor([ids])
    compat = qwen2vl.Qwen2VL.from_pretrained(tiny_dir[0], hf5_compat=True)
    o, r = run_both(compat, tiny_ref, ids, None, ig, vg)
    assert (o - r).abs().max() < 1e-4
    paper = qwen2vl.Qwen2VL.from_pretrained(tiny_dir[0])
    o2, _ = run_both(paper, tiny_ref, ids, None, ig, vg)
    n_before_tail = 1 + 1 + 24  # text, <|vision_start|>, video tokens: identical up to there
    assert (o2[:, :n_before_tail] - r[:, :n_before_tail]).abs().max() < 1e-4
    assert (o2[:, -3:] - r[:, -3:]).abs().max() > 1e-3  # text after the video moved


@pytest.mark.parametrize("batch", ["single", "left_padded"])
def test_greedy_generation_matches_transformers(tiny, tiny_ref, batch):
    if batch == "single":
        ids, ig, vg = prompt(11, ("image", 1, 4, 6), 12, ("video", 2, 4, 4), 13)
        ids, mask = torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)
    else:
        rows = [prompt(11, ("image", 1, 4, 6), 12, 13), prompt(("image", 1, 4, 4), 21, 22, 23, 24, 25, 26, 27)]
        rows.append(prompt(31, 32))
        ids, mask = left_pad([r[0] for r in rows])
        ig = torch.cat([r[1] for r in rows if r[1] is not None])
        vg = None
    pv, pvv = pixels(ig, PATCH), pixels(vg, PATCH, 2)
    with torch.no_grad():
        media = dict(pixel_values=pv, image_grid_thw=ig, pixel_values_videos=pvv, video_grid_thw=vg)
        media = {k: v for k, v in media.items() if v is not None}
        r = tiny_ref.generate(
            input_ids=ids,
            attention_mask=mask,
            mm_token_type_ids=mm_token_type_ids(ids),
            max_new_tokens=16,
            do_sample=False,
            **media,
        )[:, ids.shape[1] :]
    o = tiny.generate(ids, mask, pv, ig, pvv, vg, max_new_tokens=16)
    assert o.shape == (ids.shape[0], 16)
    assert torch.equal(o[:, : r.shape[1]], r)
    assert (o[:, r.shape[1] :] == tiny.config.pad_token_id).all()


def test_vision_tower_in_token_chunks_matches(tiny, tiny_ref, monkeypatch):
    """Inference runs token-wise parts in chunks (vision.TOKEN_CHUNK); force small chunks that split
    images mid-way and check the numbers are unchanged."""
    import qwen2vl.model.vision as vision

    monkeypatch.setattr(vision, "TOKEN_CHUNK", 7)
    grid = torch.tensor([[1, 6, 10], [3, 4, 4]])
    pv = pixels(grid, PATCH)
    with torch.no_grad():
        r = tiny_ref.model.visual(pv, grid_thw=grid).pooler_output
        o = tiny.visual(pv, grid)
    assert (o - r).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_is_bit_identical_to_reference(dtype):
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

    from qwen2vl.model.rope import apply_rotary, mrope_cos_sin

    pos = torch.randint(0, 500, (3, 2, 40))
    cos, sin = mrope_cos_sin(pos, 128, 1e6, (16, 24, 24), dtype)
    q, k = torch.randn(2, 12, 40, 128, dtype=dtype), torch.randn(2, 2, 40, 128, dtype=dtype)
    rq, rk = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(apply_rotary(q, cos[:, None], sin[:, None]), rq)
    assert torch.equal(apply_rotary(k, cos[:, None], sin[:, None]), rk)


@pytest.fixture(scope="module")
def packed(tiny_dir):
    import qwen2vl

    return qwen2vl.Qwen2VL.from_pretrained(tiny_dir[0]).eval().pack_for_cpu()


@pytest.mark.parametrize("case", ["multi_turn", "image_and_video"])
def test_packed_for_cpu_matches_transformers(packed, tiny_ref, case, tmp_path):
    from qwen2vl.model.packed import PackedLinear

    assert packed.packed and isinstance(packed.lm_head, PackedLinear)
    assert isinstance(packed.visual.blocks[0].attn.qkv, PackedLinear)
    ids, ig, vg = prompt(*CASES[case])
    o, r = run_both(packed, tiny_ref, torch.tensor([ids]), None, ig, vg)
    assert (o - r).abs().max() < 1e-4
    with pytest.raises(ValueError, match="packed for CPU inference"):
        packed.save_pretrained(tmp_path)
