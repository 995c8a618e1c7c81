"""The high-level API: ``qwen2vl.load(path)`` -> an :class:`Assistant` with ``.chat(messages) -> str`` and
``.stream(messages)`` yielding text pieces, joining the processor (messages <-> ids) and the engine (ids -> ids).
Sampling is greedy unless ``temperature`` > 0 (OpenAI's convention; the Instruct checkpoints' generation_config,
top_k 1 / top_p 0.001, is greedy in effect too). ``stop`` strings end the answer and are not part of it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from pathlib import Path

import torch

from .generate.engine import stream as stream_ids
from .generate.sampling import openai_params
from .hub import resolve_model
from .model.qwen2vl import Media
from .pretrained import Qwen2VL
from .processing.errors import MediaError
from .processing.processor import BatchInputs, Processor
from .processing.tokenizer import TextStream


def load(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    *,
    pack: bool = True,
    quantize: str | None = None,
) -> Assistant:
    """A checkpoint directory (weights, config, tokenizer, preprocessor, chat template) or a hub id, downloaded
    when huggingface_hub is installed and online, ready to chat. On the CPU the linear layers are packed for oneDNN
    (``Qwen2VL.pack_for_cpu``: inference only, faster); ``pack=False`` keeps the plain model (to train or save it).
    ``quantize="int8"``: the LLM's weights in int8 (``Qwen2VL.quantize``), for faster CPU decoding."""
    from .model.quant import check_kind

    check_kind(quantize)  # before anything loads
    path = resolve_model(path)
    model = Qwen2VL.from_pretrained(path, dtype=dtype, device=device).eval()
    if quantize:
        model.quantize(quantize)
    if pack:
        model.pack_for_cpu()
    return Assistant(model, Processor.from_pretrained(path))


def as_conversation(messages: str | Sequence[Mapping]) -> list[Mapping]:
    """A bare string is one user turn."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if isinstance(messages, Sequence) and messages and not isinstance(messages[0], Mapping):
        raise MediaError("messages: chat() takes one conversation (a list of message dicts), not a batch")
    return list(messages)


class Assistant:
    def __init__(self, model: Qwen2VL, processor: Processor):
        self.model, self.processor = model, processor

    def prepare(self, messages, **media_options) -> BatchInputs:
        """A conversation that ends with an assistant message is continued (as transformers' pipelines do)."""
        messages = as_conversation(messages)
        go_on = bool(messages) and isinstance(messages[-1], Mapping) and messages[-1].get("role") == "assistant"
        return self.processor(messages, add_generation_prompt=not go_on, continue_final_message=go_on,
                              **media_options)

    def stream(
        self,
        messages: str | Sequence[Mapping],
        *,
        max_new_tokens: int = 512,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        inputs: BatchInputs | None = None,
        **media_options,
    ) -> Iterator[str]:
        """The answer as text pieces, as they are generated. Pieces never split a UTF-8 character; text that
        could begin a stop string is held back until it is known not to."""
        params = openai_params(temperature, top_p, top_k, repetition_penalty, seed)
        inputs = inputs if inputs is not None else self.prepare(messages, **media_options)
        text = TextStream(self.processor.tokenizer, stop, frozenset(self.model.config.eos_token_ids))
        tokens = stream_ids(
            self.model, inputs["input_ids"], attention_mask=inputs["attention_mask"], media=Media.of(inputs),
            max_new_tokens=max_new_tokens, params=params,
        )  # fmt: skip
        with closing(tokens):
            for token in tokens:
                if piece := text.push(int(token[0])):
                    yield piece
                if text.stopped:
                    return
        if piece := text.finish():
            yield piece

    def chat(self, messages: str | Sequence[Mapping], **kwargs) -> str:
        """The whole answer (see :meth:`stream` for the arguments)."""
        return "".join(self.stream(messages, **kwargs))
