"""Continuous batching: requests join the running batch between decode steps and leave when done (token ids in and
out; one thread owns a :class:`Batcher` and calls ``admit`` and ``step``). All rows share one KV-cache timeline
(one write counter; ``key_mask`` marks each row's real tokens). A request is prefilled alone, as ``engine.stream``
does, and copied into a free row to end at the write position; its M-RoPE positions travel in ``next_position``,
so where it sits never changes its numbers. A full timeline is compacted (shifted left past the oldest live slot)
or grown up to ``max_len`` slots, so memory is taken as requests need it. A step runs only the rows up to the
highest live one, so a lone request runs at batch 1."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ..model.cache import KVCache
from ..model.qwen2vl import Media
from .json_mode import JsonObject
from .sampling import SamplingParams, choose, sampling_state

log = logging.getLogger("qwen2vl.batch")


@dataclass
class Sequence:
    """One request. ``emit(token_id)`` receives every new token and returns True when it ends the answer (an eos
    id or a stop string). ``finish(reason)`` is called once: "stop" (emit said so, or the constraint closed),
    "length" (max_new_tokens or the cache limit), "cancelled", or "error" (choosing or emitting its token raised:
    it ends alone). Set ``cancelled`` from any thread to end it at the next step. ``logprobs`` (k): each token's
    log-probability under the model and the k likeliest alternatives go to ``trace`` before ``emit`` sees it.
    ``constraint`` (json_mode.JsonObject): only tokens it allows are chosen, and it stops where it is complete."""

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
        for t in itertools.chain.from_iterable(c.layers):
            t[:, :, dst] = t[:, :, src].clone()
        c.key_mask[:, dst] = c.key_mask[:, src].clone()
        if offset > 0:
            c.key_mask[:, :offset] = False
        for s in self.rows:
            if s is not None:
                s.start += offset
        c.length = n + offset

    def _make_room(self, length: int = 0) -> None:
        """Room for one slot past ``length`` and past the filled ones: compact, then grow (doubling)."""
        if max(length, self.cache.length) < self.cache.capacity:
            return
        oldest = min((s.start for s in self.rows if s is not None), default=self.cache.length)
        if oldest > 0:
            self._shift(-oldest)
        needed = max(length, self.cache.length) + 1
        slots = self.cache.capacity
        while slots < needed:
            slots *= 2
        if slots > self.cache.capacity:
            self._resize(min(slots, self.max_len + 1))

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
        seq.seen, seq.generator = sampling_state(seq.params, seq.input_ids, logits.shape[-1], device)
        self._make_room(L)
        c = self.cache
        if c.length < L:  # the timeline is shorter than the prompt: move the live rows right
            self._shift(L - c.length)
        span = slice(c.length - L, c.length)  # its keys/values end at the write position
        for (k, v), (k1, v1) in zip(c.layers, own.layers):
            k[row, :, span], v[row, :, span] = k1[0], v1[0]
        c.key_mask[row] = False
        c.key_mask[row, span] = True
        c.next_position[row] = own.next_position[0]
        seq.row, seq.start = row, span.start
        self.rows[row] = seq
        self._take(seq, logits[0:1])

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step for every live row."""
        for s in self.rows:
            if s is not None and s.cancelled:
                self._retire(s, "cancelled")
        if not self.active:
            return
        n = max(i for i, s in enumerate(self.rows) if s is not None) + 1
        self._make_room()
        c = self.cache
        view = replace(
            c, layers=[(k[:n], v[:n]) for k, v in c.layers], key_mask=c.key_mask[:n], next_position=c.next_position[:n]
        )
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

    def _take(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Choose, emit and record the next token of ``seq``; retire it when it is done, or alone when this fails."""
        try:
            token = self._choose(seq, logits)
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
        except Exception:
            log.exception("sequence in row %d failed; ending it alone", seq.row)
            self._retire(seq, "error")

    @staticmethod
    def _choose(seq: Sequence, logits: torch.Tensor, tries: int = 1024) -> int:
        """The sampler's choice, among the tokens the constraint allows if there is one: a refused choice is masked
        and the choice made again (the likely tokens are nearly always allowed, so this is a few checks a step)."""
        logits = logits.clone() if seq.constraint is not None else logits  # the masks must not reach the logprobs
        for _ in range(tries):
            token = int(choose(logits, seq.params, seq.seen, seq.generator)[0])
            if seq.constraint is None or seq.constraint.after(token) is not None:
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
        """End every live row (``finish(reason)``) and free it: what a server does when a failed step left the
        shared cache untrusted."""
        for s in [s for s in self.rows if s is not None]:
            self._retire(s, reason)
