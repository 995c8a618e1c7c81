"""Continuous batching: sequences that join and leave a running batch get exactly the tokens they get alone,
through compaction and growth of the shared timeline; cancellation and limits end them."""

import torch

from helpers import pixels, prompt
from qwen2vl.generate.batch import Batcher, Sequence
from qwen2vl.model.qwen2vl import Media
from qwen2vl.generate.engine import generate
from qwen2vl.generate.sampling import SamplingParams


def run(batcher, seqs, order=None):
    """Admit the sequences as rows free up, stepping until all are done."""
    waiting = list(seqs)
    while waiting or batcher.active:
        while waiting and batcher.free:
            batcher.admit(waiting.pop(0))
        batcher.step()


def make(ids, media, n, out, done, params=SamplingParams(), eos=frozenset()):
    key = len(out)
    out[key], done[key] = [], None
    emit = lambda t: t in eos or out[key].append(t)  # noqa: E731  (True: an eos id ends the answer, unemitted)
    return Sequence(ids, media, n, params, emit=emit, finish=lambda r: done.__setitem__(key, r))


def test_joining_and_leaving_gives_the_tokens_of_a_lone_run(tiny):
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 150000, (1, n), generator=g) for n in (5, 17, 3, 40, 9, 12, 25, 7)]
    ids, ig, _ = prompt(11, ("image", 1, 4, 6), 12)
    rows.insert(2, torch.tensor([ids]))
    media = {2: Media(pixels(ig, 1176), ig)}
    lengths = [12, 7, 12, 3, 12, 9, 12, 12, 5]
    alone = [generate(tiny, r, max_new_tokens=n, media=media.get(i), eos_token_ids=())[0].tolist()
             for i, (r, n) in enumerate(zip(rows, lengths))]  # fmt: skip
    out, done = {}, {}
    batcher = Batcher(tiny, max_batch_size=3, max_len=64, initial_slots=8)  # forces growth and compaction
    for k, v in batcher.cache.layers:  # stale values in slots a row never wrote must stay masked out
        k.fill_(1e4)
        v.fill_(-1e4)
    run(batcher, [make(r, media.get(i, Media()), n, out, done) for i, (r, n) in enumerate(zip(rows, lengths))])
    assert [out[i] for i in range(len(rows))] == alone
    assert set(done.values()) == {"length"}
    assert batcher.cache.capacity <= 65 and batcher.cache.length == 0


def test_eos_cancel_and_the_length_limit(tiny):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 150000, (1, 6), generator=g), torch.randint(0, 150000, (1, 30), generator=g)
    first = generate(tiny, a, max_new_tokens=4, eos_token_ids=())[0].tolist()
    out, done = {}, {}
    batcher = Batcher(tiny, max_batch_size=2, max_len=40)
    stop_at_third = make(a, Media(), 10, out, done, eos=frozenset({first[2]}))
    cancelled = make(b, Media(), 50, out, done)
    batcher.admit(stop_at_third)
    batcher.admit(cancelled)
    batcher.step()
    batcher.step()
    cancelled.cancelled = True
    batcher.step()
    assert out[0] == first[: first.index(first[2])] and done[0] == "stop"  # the eos token itself is not emitted
    assert len(out[1]) == 3 and done[1] == "cancelled"
    again = make(b, Media(), 50, out, done)
    batcher.admit(again)
    batcher.step()
    batcher.end_all("error")  # what the server does after a failed step
    assert done[2] == "error" and batcher.active == 0 and batcher.free == 2 and batcher.cache.length == 0
    batcher.end_all("error")  # nothing live: nothing to end
    out, done = {}, {}
    long = make(b, Media(), 100, out, done)
    run(Batcher(tiny, max_batch_size=1, max_len=40), [long])
    assert done[0] == "length" and len(out[0]) == 40 - 30  # the cache limit, not max_new_tokens


def test_sampled_rows_are_seeded_per_request(tiny):
    ids = torch.tensor([[5, 6, 7, 8]])
    params = SamplingParams(do_sample=True, temperature=1.0, seed=3)
    out, done = {}, {}
    run(Batcher(tiny, max_batch_size=2), [make(ids, Media(), 8, out, done, params), make(ids, Media(), 8, out, done, params)])
    alone = generate(tiny, ids, max_new_tokens=8, params=params, eos_token_ids=())[0].tolist()
    assert out[0] == out[1] == alone


def test_a_prompt_longer_than_the_compacted_timeline_is_admitted(tiny):
    """A full timeline whose live rows fill fewer slots, after compaction, than a new prompt's length: the prompt
    must still land whole (it once raised a shape error, and the server's request ended in "error")."""
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, 150000, (1, n), generator=g) for n in (5, 1, 6)]
    lengths = [2, 9, 5]
    alone = [generate(tiny, r, max_new_tokens=n, eos_token_ids=())[0].tolist() for r, n in zip(rows, lengths)]
    out, done = {}, {}
    seqs = [make(r, Media(), n, out, done) for r, n in zip(rows, lengths)]
    batcher = Batcher(tiny, max_batch_size=3, max_len=256, initial_slots=8)
    batcher.admit(seqs[0])
    batcher.admit(seqs[1])
    for _ in range(3):  # the first ends; the timeline is full, the second row holding only a few slots
        batcher.step()
    batcher.admit(seqs[2])
    run(batcher, [])
    assert [out[i] for i in range(3)] == alone
    assert set(done.values()) == {"length"}
