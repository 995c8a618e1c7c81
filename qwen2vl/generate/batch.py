"""Continuous batching: requests join the running batch between decode steps and leave when done.

Token ids in, token ids out (no text). One thread owns a :class:`Batcher` and calls ``admit`` and ``step``.

How the rows share one KV cache: the cache is a timeline of slots shared by all rows (``KVCache``: one write
counter, ``key_mask`` marking each row's real tokens). A new request is prefilled alone (batch 1, exactly as
``generate.engine.stream`` does) and its keys/values are copied into a free row so that they end at the current
write position; its M-RoPE positions travel in ``next_position``, so where a row sits on the timeline never
changes its numbers. Every decode step then writes one slot for all rows at once. When the timeline is full it
is compacted (everything shifted left past the oldest live slot) or grown, up to ``max_len`` slots: memory is
taken as requests need it, not reserved for the worst case at start-up.

Only rows up to the highest live one take part in a step (a view of the first rows of the cache), so a lone
request runs at batch 1.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..model.cache import KVCache
from ..model.qwen2vl import Media
from .json_mode import JsonObject
from .sampling import SamplingParams, choose

log = logging.getLogger("qwen2vl.batch")


@dataclass
class Sequence:
    """One request: its prompt (batch 1), limits and sampling, and where its tokens go.

    ``emit(token_id)`` receives every new token and says whether it ends the answer: the caller's token loop
    (``processing.tokenizer.TextStream``) met an eos id or a stop string. ``finish(reason)`` is called once at
    the end with "stop" (emit said so, or the constraint closed), "length" (max_new_tokens or the cache limit),
    "cancelled" or "error" (choosing or emitting its token raised: that sequence ends alone, the batch goes on).
    Set ``cancelled`` from any thread to end the sequence at the next step.

    ``logprobs`` (k): each emitted token's log-probability under the model (before sampling's transforms) and the k
    most likely alternatives are appended to ``trace`` before ``emit`` sees the token. ``constraint``
    (json_mode.JsonObject): only tokens it allows are chosen, and the sequence stops where it is complete."""

    input_ids: torch.Tensor  # [1, L]
    media: Media
    max_new_tokens: int
    params: SamplingParams
    emit: Callable[[int], bool | None]
    finish: Callable[[str], None]
    cancelled: bool = False
    generated: int = 0
    last: int = 0  # the newest token, fed to the next step
    seen: torch.Tensor | None = None  # [1, V] for the repetition penalty
    generator: torch.Generator | None = None
    row: int = -1
    start: int = 0  # first slot of this row's tokens on the timeline
    done: bool = field(default=False, repr=False)
    logprobs: int | None = None
    trace: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    constraint: JsonObject | None = None


class Batcher:
    def __init__(self, model, max_batch_size: int = 8, max_len: int = 32768, initial_slots: int = 512):
        self.model = model
        self.config = model.config
        self.max_batch_size, self.max_len = max_batch_size, max_len
        self.rows: list[Sequence | None] = [None] * max_batch_size
        self.cache = KVCache.allocate(
            self.config.text, max_batch_size, min(initial_slots, max_len), model.dtype, model.device, zeroed=True
        )
        self.cache.padded = True  # rows hold different amounts: always mask

    # -- bookkeeping ---------------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def free(self) -> int:
        return self.max_batch_size - self.active

    def _resize(self, slots: int) -> None:
        """Reallocate the timeline to ``slots`` slots, keeping the filled part."""
        old, n = self.cache, self.cache.length
        new = KVCache.allocate(
            self.config.text, self.max_batch_size, slots, self.model.dtype, self.model.device, zeroed=True
        )
        for (k, v), (k2, v2) in zip(old.layers, new.layers):
            k2[:, :, :n], v2[:, :, :n] = k[:, :, :n], v[:, :, :n]
        new.key_mask[:, :n] = old.key_mask[:, :n]
        new.next_position, new.length, new.padded = old.next_position, n, True
        self.cache = new

    def _shift(self, offset: int) -> None:
        """Move the filled part of the timeline ``offset`` slots (right if > 0, left if < 0)."""
        c, n = self.cache, self.cache.length
        src = slice(max(0, -offset), n)
        dst = slice(max(0, offset), n + offset)
        for k, v in c.layers:
            k[:, :, dst] = k[:, :, src].clone()
            v[:, :, dst] = v[:, :, src].clone()
        c.key_mask[:, dst] = c.key_mask[:, src].clone()
        if offset > 0:
            c.key_mask[:, :offset] = False
        for s in self.rows:
            if s is not None:
                s.start += offset
        c.length = n + offset

    def _make_room(self, needed_length: int) -> None:
        """Make the timeline able to hold ``needed_length`` slots: compact, then grow (doubling)."""
        if needed_length <= self.cache.capacity:
            return
        live = [s.start for s in self.rows if s is not None]
        oldest = min(live) if live else self.cache.length
        if oldest > 0:
            self._shift(-oldest)
            needed_length -= oldest
        if needed_length > self.cache.capacity:
            slots = self.cache.capacity
            while slots < needed_length:
                slots *= 2
            self._resize(min(max(slots, needed_length), self.max_len + 1))

    # -- the two operations -------------------------------------------------------------------------------

    @torch.inference_mode()
    def admit(self, seq: Sequence) -> None:
        """Prefill ``seq`` alone, emit its first token and give it a row (it must have a free one)."""
        L = seq.input_ids.shape[1]
        if L >= self.max_len:
            raise ValueError(f"the prompt has {L} tokens; at most {self.max_len - 1} fit")
        row = self.rows.index(None)
        device = self.model.device
        own = KVCache.allocate(self.config.text, 1, L, self.model.dtype, device)
        logits, own = self.model.prefill(seq.input_ids.to(device), own, media=seq.media.to(device))
        if seq.params.repetition_penalty is not None:
            seq.seen = torch.zeros(1, logits.shape[-1], dtype=torch.bool, device=device)
            seq.seen[0, seq.input_ids[0].to(device)] = True
        if seq.params.do_sample and seq.params.seed is not None:
            seq.generator = torch.Generator(device=device).manual_seed(seq.params.seed)

        # place its keys/values so that they end at the write position
        if self.cache.length < L:  # the timeline is shorter than the prompt: move the live rows right
            self._make_room(L + 1)
            if self.cache.length > 0:
                self._shift(L - self.cache.length)
            self.cache.length = L
        else:
            self._make_room(self.cache.length + 1)
        c = self.cache
        end = c.length
        for (k, v), (k1, v1) in zip(c.layers, own.layers):
            k[row, :, end - L : end], v[row, :, end - L : end] = k1[0], v1[0]
        c.key_mask[row] = False
        c.key_mask[row, end - L : end] = True
        c.next_position[row] = own.next_position[0]
        seq.row, seq.start = row, end - L
        self.rows[row] = seq
        self._take(seq, logits[0:1])

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step for every live row."""
        self._retire_cancelled()
        if not self.active:
            return
        n = max(i for i, s in enumerate(self.rows) if s is not None) + 1
        self._make_room(self.cache.length + 1)
        c = self.cache
        view = KVCache(
            layers=[(k[:n], v[:n]) for k, v in c.layers], key_mask=c.key_mask[:n],
            next_position=c.next_position[:n], length=c.length, padded=True,
        )  # fmt: skip
        tokens = torch.tensor(
            [s.last if s is not None else self.config.pad_token_id for s in self.rows[:n]], device=self.model.device
        )
        logits, view = self.model.decode(tokens, view)
        c.next_position[:n] = view.next_position
        c.length = view.length
        for i, s in enumerate(self.rows[:n]):
            if s is None:
                c.key_mask[i] = False  # the step wrote a slot for the empty row too
            else:
                self._take(s, logits[i : i + 1])

    # -- per sequence -------------------------------------------------------------------------------------

    def _take(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Choose, emit and record the next token of ``seq``; retire it when it is done, or alone when this fails."""
        try:
            self._next(seq, logits)
        except Exception:
            log.exception("sequence in row %d failed; ending it alone", seq.row)
            self._retire(seq, "error")

    def _next(self, seq: Sequence, logits: torch.Tensor) -> None:
        if seq.constraint is not None:
            token = self._allowed(seq, logits)
        else:
            token = int(choose(logits, seq.params, seq.seen, seq.generator)[0])
        if seq.logprobs is not None:
            logp = torch.log_softmax(logits[0].float(), -1)
            top = logp.topk(seq.logprobs)
            seq.trace.append((float(logp[token]), list(zip(top.indices.tolist(), top.values.tolist()))))
        seq.generated += 1
        seq.last = token
        if seq.seen is not None:
            seq.seen[0, token] = True
        if seq.emit(token):
            return self._retire(seq, "stop")
        if seq.constraint is not None:
            seq.constraint.advance(token)
            if seq.constraint.done:  # the object closed: nothing more may follow
                return self._retire(seq, "stop")
        at_limit = seq.input_ids.shape[1] + seq.generated >= self.max_len  # prompt + answer fill max_len
        if seq.generated >= seq.max_new_tokens or at_limit:
            self._retire(seq, "length")

    @staticmethod
    def _allowed(seq: Sequence, logits: torch.Tensor, tries: int = 1024) -> int:
        """The sampler's choice among the tokens the constraint allows: a refused choice is masked and the
        choice made again (the likely tokens are nearly always allowed, so this is a few checks a step)."""
        logits = logits.clone()
        for _ in range(tries):
            token = int(choose(logits, seq.params, seq.seen, seq.generator)[0])
            if seq.constraint.after(token) is not None:
                return token
            logits[0, token] = float("-inf")
        raise RuntimeError(f"no allowed token among the {tries} most likely")

    @torch.inference_mode()  # the cache's tensors may be inference tensors (made in admit/step): write them here
    def _retire(self, seq: Sequence, reason: str) -> None:
        if seq.done:
            return
        seq.done = True
        if seq.row >= 0 and self.rows[seq.row] is seq:
            self.rows[seq.row] = None
            self.cache.key_mask[seq.row] = False
        if not self.active:
            self.cache.length = 0  # nothing live: start the timeline over
        try:
            seq.finish(reason)
        except Exception:  # a listener that is gone must not take the engine with it
            log.exception("finish callback failed")

    def end_all(self, reason: str) -> None:
        """End every live row now (``finish(reason)`` on each) and free its slot: what a server does when a step
        failed and the shared cache can no longer be trusted."""
        for s in [s for s in self.rows if s is not None]:
            self._retire(s, reason)

    def _retire_cancelled(self) -> None:
        for s in self.rows:
            if s is not None and s.cancelled:
                self._retire(s, "cancelled")
