"""Generation: cached decoding equals recomputing, rows stop independently, sampling is seeded and
follows transformers' logits processors."""

import pytest
import torch

from helpers import left_pad, pixels, prompt
from qwen2vl.model.cache import KVCache
from qwen2vl.model.qwen2vl import Media
from qwen2vl.generate.engine import stream
from qwen2vl.generate.sampling import SamplingParams, top_k_filter, top_p_filter, apply_repetition_penalty


def batch():
    rows = [prompt(11, ("image", 1, 4, 6), 12, 13), prompt(("video", 2, 4, 4), 21, 22, 23, 24, 25), prompt(31, 32)]
    ids, mask = left_pad([r[0] for r in rows])
    ig = torch.cat([r[1] for r in rows if r[1] is not None])
    vg = torch.cat([r[2] for r in rows if r[2] is not None])
    return ids, mask, pixels(ig, 1176), ig, pixels(vg, 1176, 2), vg


def test_cached_decode_equals_full_recompute(tiny):
    ids, mask, pv, ig, pvv, vg = batch()
    n = 10
    out = tiny.generate(ids, mask, pv, ig, pvv, vg, max_new_tokens=n)
    full_ids = torch.cat([ids, out], 1)
    full_mask = torch.cat([mask, torch.ones_like(out)], 1)
    with torch.no_grad():
        logits = tiny(full_ids, full_mask, pv, ig, pvv, vg)
    assert torch.equal(logits[:, ids.shape[1] - 1 : -1].argmax(-1), out)

    # and the logits themselves, step by step
    cache = KVCache.allocate(tiny.config.text, 3, ids.shape[1] + n, torch.float32, "cpu")
    with torch.no_grad():
        step_logits, cache = tiny.prefill(ids, cache, mask, Media(pv, ig, pvv, vg))
        for i in range(n):
            assert (step_logits - logits[:, ids.shape[1] - 1 + i]).abs().max() < 1e-4
            step_logits, cache = tiny.decode(out[:, i], cache)


def test_appending_a_turn_to_the_cache_equals_one_prompt(tiny):
    """A second turn with a new image, prefilled after the first turn's cache, continues at max+1."""
    a, ig_a, _ = prompt(11, ("image", 1, 4, 4), 12)
    b, ig_b, _ = prompt(13, ("image", 1, 6, 4), 14, 15)
    pa, pb = pixels(ig_a, 1176), pixels(ig_b, 1176, 5)
    cache = KVCache.allocate(tiny.config.text, 1, len(a) + len(b), torch.float32, "cpu")
    with torch.no_grad():
        _, cache = tiny.prefill(torch.tensor([a]), cache, None, Media(pa, ig_a))
        last, cache = tiny.prefill(torch.tensor([b]), cache, None, Media(pb, ig_b))
        whole = tiny(torch.tensor([a + b]), None, torch.cat([pa, pb]), torch.cat([ig_a, ig_b]))
    assert (last - whole[:, -1]).abs().max() < 1e-4


def test_rows_finish_independently(tiny):
    ids, mask, pv, ig, pvv, vg = batch()
    free = tiny.generate(ids, mask, pv, ig, pvv, vg, max_new_tokens=8)
    stop = int(free[0, 2])  # make row 0's third token an end-of-sequence id
    out = tiny.generate(ids, mask, pv, ig, pvv, vg, max_new_tokens=8, eos_token_ids=[stop])
    pad = tiny.config.pad_token_id
    for r in range(3):
        hits = (free[r] == stop).nonzero().flatten().tolist()
        end = hits[0] + 1 if hits else 8
        assert torch.equal(out[r, :end], free[r, :end])
        assert (out[r, end:] == pad).all()
    assert (out[0, 3:] == pad).all()


def test_stream_ends_early_when_all_rows_are_done(tiny):
    ids = torch.tensor([[11, 12, 13]])
    first = tiny.generate(ids, max_new_tokens=1)[0, 0].item()
    steps = list(stream(tiny, ids, max_new_tokens=20, eos_token_ids=[first]))
    assert len(steps) == 1 and steps[0].tolist() == [first]
    assert tiny.generate(ids, max_new_tokens=5, eos_token_ids=[first])[0].tolist()[1:] == [tiny.config.pad_token_id] * 4


def test_sampling_is_seeded(tiny):
    ids, mask, pv, ig, pvv, vg = batch()
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9)
    a = tiny.generate(ids, mask, pv, ig, pvv, vg, seed=7, **kw)
    b = tiny.generate(ids, mask, pv, ig, pvv, vg, seed=7, **kw)
    c = tiny.generate(ids, mask, pv, ig, pvv, vg, seed=8, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = tiny.generate(ids, mask, pv, ig, pvv, vg, max_new_tokens=8)
    top1 = tiny.generate(ids, mask, pv, ig, pvv, vg, max_new_tokens=8, do_sample=True, top_k=1, seed=3)
    assert torch.equal(greedy, top1)


def test_processors_match_transformers():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 500, generator=g) * 3
    ids = torch.randint(0, 500, (4, 30), generator=g)
    seen = torch.zeros(4, 500, dtype=torch.bool).scatter_(1, ids, True)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), ref)
    for k in (1, 7, 50):
        assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(k)(ids, logits.clone()))
    for p in (0.05, 0.5, 0.9, 0.999):
        scaled = TemperatureLogitsWarper(0.7)(ids, logits.clone())
        assert torch.equal(top_p_filter(scaled, p), TopPLogitsWarper(p)(ids, scaled.clone()))


def test_repetition_penalty_greedy_matches_transformers(tiny, tiny_ref):
    from helpers import mm_token_type_ids

    ids, ig, _ = prompt(11, ("image", 1, 4, 6), 12, 13)
    ids = torch.tensor([ids])
    pv = pixels(ig, 1176)
    with torch.no_grad():
        r = tiny_ref.generate(input_ids=ids, pixel_values=pv, image_grid_thw=ig, mm_token_type_ids=mm_token_type_ids(ids),
                              max_new_tokens=12, do_sample=False, repetition_penalty=1.5)[:, ids.shape[1]:]
    o = tiny.generate(ids, None, pv, ig, max_new_tokens=12, repetition_penalty=1.5)
    assert torch.equal(o[:, : r.shape[1]], r)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
        (dict(top_k=0), "top_k must be >= 1"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(repetition_penalty=-1.0), "repetition_penalty must be > 0"),
    ],
)
def test_bad_sampling_parameters(tiny, kw, message):
    with pytest.raises(ValueError, match=message):
        tiny.generate(torch.tensor([[1, 2]]), max_new_tokens=2, **kw)


def test_right_padding_is_refused(tiny):
    with pytest.raises(ValueError, match="left-padded"):
        tiny.generate(torch.tensor([[1, 2, 0]]), torch.tensor([[1, 1, 0]]), max_new_tokens=2)
