"""An OpenAI-compatible server: HTTP <-> processor and batcher; no model logic here.

Requests are preprocessed on worker threads (a bad image is a 400 before anything is queued), then queued (bounded:
when full, an immediate 429) for the one engine thread that owns the model and batches continuously. Media counts
are checked before anything is downloaded; what may be read or fetched is ``ServerConfig.media_access``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import functools
import json
import logging
import queue
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..assistant import Assistant
from ..generate.batch import Batcher, Sequence
from ..generate.json_mode import JsonObject
from ..generate.sampling import openai_params
from ..model.qwen2vl import Media
from ..processing.errors import MediaError
from ..processing.fetch import FetchPolicy
from ..processing.sources import MediaAccess
from ..processing.tokenizer import TextStream
from .metrics import Metrics
from .schemas import ApiError, ChatRequest, chunk, completion, completion_id, parse_body, to_qwen_messages
from .tools import ToolStream, plan

log = logging.getLogger("qwen2vl.serve")


@dataclass
class ServerConfig:
    model_name: str = "qwen2vl"
    api_key: str | None = None
    max_model_len: int = 32768
    max_batch_size: int = 8
    max_queue: int = 32  # requests waiting for a row; beyond this: 429
    limit_mm_per_prompt: dict[str, int] = field(default_factory=lambda: {"image": 4, "video": 1})
    allowed_local_media_path: str | None = None
    allowed_media_domains: tuple[str, ...] = ()
    fetch_timeout: float = 10.0
    max_media_bytes: int = 32 * 2**20
    max_request_bytes: int = 64 * 2**20  # a body over this is a 413 before it is read further
    tool_format: str = "qwen"  # how tools, calls and results are written for the model: qwen | hermes
    video_cache: str | None = None  # a directory of decoded clips (processing/video_cache.py), keyed by content
    video_cache_size: int | None = 10 * 2**30  # bytes it may hold, least recently used evicted; None: no bound

    def media_access(self) -> MediaAccess:
        local = Path(self.allowed_local_media_path) if self.allowed_local_media_path else False
        policy = FetchPolicy(self.fetch_timeout, self.max_media_bytes, tuple(self.allowed_media_domains))
        return MediaAccess(local=local, fetch=policy, max_bytes=self.max_media_bytes)


class Engine:
    """The one thread that touches the model. A failed step ends what was running ("error"); if that fails too,
    a fresh batcher replaces it (``restarts``). Should the thread die, ``alive`` turns false: /health answers 503
    and requests fail at once, never wait."""

    def __init__(self, model, max_batch_size: int, max_len: int, max_queue: int):
        self.model, self.max_batch_size, self.max_len = model, max_batch_size, max_len
        self.batcher = Batcher(model, max_batch_size=max_batch_size, max_len=max_len)
        self.waiting: queue.Queue[Sequence] = queue.Queue(maxsize=max_queue)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="qwen2vl-engine", daemon=True)
        self.steps = self.restarts = 0

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.stopping.is_set()

    def submit(self, seq: Sequence) -> None:
        """Queue ``seq``, or refuse it at once: 503 when the engine has stopped, 429 when the queue is full."""
        if not self.alive:
            raise ApiError(503, "the engine has stopped; the server must be restarted", code="engine_stopped")
        try:
            self.waiting.put_nowait(seq)
        except queue.Full:
            raise ApiError(429, "the server is at capacity; retry later", code="overloaded") from None

    @property
    def running(self) -> int:
        return self.batcher.active

    def _run(self) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    self._admit()
                    if self.batcher.active:
                        self.batcher.step()
                        self.steps += 1
                except Exception:  # fail what is running, keep serving
                    log.exception("engine step failed; ending the running requests")
                    self._recover()
        finally:
            if not self.stopping.is_set():
                log.critical("the engine thread died; /health now answers 503")
            self._fail_waiting()

    def _recover(self) -> None:
        try:
            self.batcher.end_all("error")
        except Exception:
            log.exception("recovery failed; restarting the engine with a fresh cache")
            held = [s for s in self.batcher.rows if s is not None and not s.done]
            self.batcher = Batcher(self.model, max_batch_size=self.max_batch_size, max_len=self.max_len)
            self.restarts += 1
            for s in held:
                s.done = True
                with contextlib.suppress(Exception):
                    s.finish("error")

    def _fail_waiting(self) -> None:
        while not self.waiting.empty():  # this thread is the only consumer
            seq = self.waiting.get_nowait()
            with contextlib.suppress(Exception):
                seq.finish("error")

    def _admit(self) -> None:
        while self.batcher.free:
            try:
                seq = self.waiting.get(timeout=0.05) if not self.batcher.active else self.waiting.get_nowait()
            except queue.Empty:
                return
            if seq.cancelled:
                seq.finish("cancelled")
                continue
            try:
                self.batcher.admit(seq)
            except Exception as e:
                log.exception("prefill failed")
                if not seq.done:
                    seq.done = True
                    seq.finish("error" if not isinstance(e, ValueError) else "length")


def create_app(assistant: Assistant, config: ServerConfig) -> FastAPI:
    model = assistant.model
    processor = copy.copy(assistant.processor)  # the same tokenizer and template, the server's media access
    media = {"access": config.media_access()}
    if config.video_cache:  # else the processor's own (normally none)
        media |= {"video_cache": config.video_cache, "video_cache_size": config.video_cache_size}
    processor.media = dataclasses.replace(processor.media, **media)
    token_text = functools.lru_cache(maxsize=2**17)(lambda t: processor.tokenizer.decode([t]))  # one token's text
    engine = Engine(model, config.max_batch_size, config.max_model_len, config.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="qwen2vl", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    metrics = Metrics()
    app.state.engine, app.state.config, app.state.metrics = engine, config, metrics
    app.add_middleware(RequestIds, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(ApiError(e.status_code, str(e.detail), "invalid_request_error").body(), e.status_code)

    def authorize(request: Request) -> None:
        if config.api_key is not None and request.headers.get("authorization", "") != f"Bearer {config.api_key}":
            raise ApiError(401, "invalid or missing API key", "authentication_error", "invalid_api_key")

    @app.get("/health")
    def health():
        state = {"running": engine.running, "waiting": engine.waiting.qsize(), "restarts": engine.restarts}
        if not engine.alive:
            return JSONResponse({"status": "engine stopped", **state}, status_code=503)
        return {"status": "ok", **state}

    @app.get("/metrics")
    def prometheus():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "owned_by": "qwen2vl",
                                            "created": 0, "max_model_len": config.max_model_len}]}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        req = ChatRequest.parse(parse_body(await read_body(request, config.max_request_bytes)))
        if req.limit is not None and req.limit > config.max_model_len:
            raise ApiError(400, f"max_tokens: {req.limit} is above the model length ({config.max_model_len})",
                           code="invalid_value")  # fmt: skip
        if req.model is not None and req.model != config.model_name:
            raise ApiError(404, f"model {req.model!r} does not exist; this server has {config.model_name!r}",
                           code="model_not_found")  # fmt: skip
        messages, counts = to_qwen_messages(req.messages)
        messages, continued, tools = plan(req, messages, config.tool_format)
        for kind, n in counts.items():  # before anything is downloaded or decoded
            if n > config.limit_mm_per_prompt.get(kind, 0):
                raise ApiError(400, f"too many {kind}s: {n}, at most {config.limit_mm_per_prompt.get(kind, 0)} "
                                    "per request", code="too_many_media")  # fmt: skip
        options = req.mm_processor_kwargs.model_dump(exclude_none=True) if req.mm_processor_kwargs else {}
        try:
            inputs = await run_in_threadpool(processor, messages, not continued, continue_final_message=continued,
                                             **options)
        except MediaError as e:
            raise ApiError(400, str(e), code="invalid_media") from None
        except ValueError as e:  # the processor's own checks (sizes, options, text)
            raise ApiError(400, str(e), code="invalid_value") from None
        L = inputs["input_ids"].shape[1]
        if L >= config.max_model_len:
            raise ApiError(400, f"the prompt has {L} tokens; --max-model-len is {config.max_model_len}",
                           code="context_length_exceeded")  # fmt: skip
        limit = min(req.limit or config.max_model_len, config.max_model_len - L)
        try:
            params = openai_params(req.temperature, req.top_p, req.top_k, req.repetition_penalty, req.seed)
        except ValueError as e:
            raise ApiError(400, str(e), code="invalid_value") from None

        eos = frozenset(model.config.eos_token_ids)
        top = (req.top_logprobs or 0) if req.logprobs else None
        json_mode = req.response_format is not None and req.response_format.type == "json_object"
        json_mode = json_mode or (tools is not None and tools.constrain)
        stops = req.stops + (tools.stops if tools else [])
        events: asyncio.Queue = asyncio.Queue()  # of every answer, posted from the engine thread
        post = functools.partial(asyncio.get_running_loop().call_soon_threadsafe, events.put_nowait)
        answers = []
        for i in range(req.n):  # n answers: n sequences of one prompt, seeds seed, seed + 1, ...
            seed = None if params.seed is None else (params.seed + i if params.seed + i < 2**64 else params.seed - i)
            a = Answer(i, TextStream(processor.tokenizer, stops, eos), post, metrics, token_text)
            a.seq = Sequence(
                inputs["input_ids"], Media.of(inputs), limit, dataclasses.replace(params, seed=seed),
                emit=a.emit, finish=a.finish, logprobs=top,
                constraint=JsonObject(token_text, eos) if json_mode else None,
            )  # fmt: skip
            answers.append(a)

        def cancel() -> None:  # a no-op for what has finished; frees the rows of the rest
            for a in answers:
                a.seq.cancelled = True

        try:
            for a in answers:
                engine.submit(a.seq)
        except ApiError:  # refused: the answers already queued must not run
            cancel()
            raise
        rid, name = completion_id(), config.model_name

        if not req.stream:
            try:
                async for _ in outputs(request, engine, events, len(answers)):
                    pass
            finally:
                cancel()
            choices = []
            for a in answers:
                text, calls = a.full, []
                if tools is not None:
                    text, calls = tools.answer(a.full, stopped=a.finish_reason == "stop")
                choices.append({"text": text, "tool_calls": calls, "logprobs": a.entries if top is not None else None,
                                "finish_reason": "tool_calls" if calls else a.finish_reason})
            return completion(rid, name, choices, usage_of(L, inputs.media, answers))

        async def sse():
            def event(payload: dict) -> str:
                return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

            streams = {a.index: ToolStream(tools) for a in answers} if tools is not None else {}
            held: dict[int, list] = {a.index: [] for a in answers}  # logprob entries of text not sent yet
            try:
                for a in answers:
                    yield event(chunk(rid, name, {"role": "assistant", "content": ""}, index=a.index))
                async for a, piece, entries in outputs(request, engine, events, len(answers)):
                    held[a.index] += entries
                    ts, reason = streams.get(a.index), a.finish_reason
                    if piece is not None:
                        piece = ts.feed(piece) if ts else piece
                        if piece:
                            logprobs, held[a.index] = (held[a.index] if top is not None else None), []
                            yield event(chunk(rid, name, {"content": piece}, index=a.index, logprobs=logprobs))
                        continue
                    if ts:
                        rest, calls = ts.close(stopped=reason == "stop")
                        if rest:
                            yield event(chunk(rid, name, {"content": rest}, index=a.index))
                        for k, c in enumerate(calls):
                            yield event(chunk(rid, name, {"tool_calls": [{"index": k, **c}]}, index=a.index))
                        reason = "tool_calls" if calls else reason
                    logprobs = held[a.index] if top is not None else None
                    yield event(chunk(rid, name, {}, reason, index=a.index, logprobs=logprobs))
                if req.stream_options and req.stream_options.include_usage:
                    yield event(chunk(rid, name, {}, usage=usage_of(L, inputs.media, answers)))
            except ApiError as e:  # the headers are sent: the error is an event, then the end
                log.error("request %s: %s", request.scope.get("request_id", "-"), e.message)
                yield event(e.body())
            finally:
                cancel()
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


@dataclass
class Answer:
    """One of the request's ``n`` answers. Its tokens go through ``text`` on the engine thread, which ends the
    sequence at once at an eos id or a stop string; what it releases is posted to the request's events."""

    index: int
    text: TextStream
    post: Callable[[tuple], None]
    metrics: Metrics
    token_text: Callable[[int], str]
    seq: Sequence = field(init=False)
    full: str = ""
    finish_reason: str = "stop"
    entries: list[dict] = field(default_factory=list)  # logprobs, one per token
    sent: int = 0  # entries already streamed

    def emit(self, token: int) -> bool:
        """(Engine thread) the text ``token`` releases, posted; True when it ends the answer."""
        piece = self.text.push(token)
        counted = token not in self.text.eos_ids  # the eos id is no part of the answer
        if counted:
            self.metrics.token()
        self.post((self, "token", token if counted else None, piece))
        return self.text.stopped

    def finish(self, reason: str) -> None:
        """(Engine thread) the end, with the text still held back, posted."""
        tail = ""
        try:
            tail = "" if reason == "error" else self.text.finish()
        finally:
            self.post((self, "finish", reason, tail))

    def _new_entries(self) -> list[dict]:
        new, self.sent = self.entries[self.sent :], len(self.entries)
        return new

    def _entry(self, token: int) -> None:
        if self.seq.logprobs is None:
            return
        logprob, top = self.seq.trace[len(self.entries)]
        text = self.token_text(token)
        self.entries.append({"token": text, "logprob": logprob, "bytes": list(text.encode()), "top_logprobs": [
            {"token": (t := self.token_text(i)), "logprob": lp, "bytes": list(t.encode())} for i, lp in top]})


async def outputs(request: Request, engine: Engine, events: asyncio.Queue, n: int):
    """(answer, text piece, its new logprob entries) as they come, and (answer, None, ...) when one ends, until all
    ``n`` have; a disconnect ends early."""
    while n:
        try:
            a, kind, value, piece = await asyncio.wait_for(events.get(), timeout=1.0)
        except TimeoutError:
            if await request.is_disconnected():
                return
            if not engine.alive and events.empty():
                raise ApiError(503, "the engine has stopped", "server_error", "engine_stopped") from None
            continue
        if kind == "finish" and value == "error":
            raise ApiError(500, "generation failed", "server_error", "generation_failed")
        if kind == "token" and value is not None:
            a._entry(value)
        if piece:
            a.full += piece
            yield a, piece, a._new_entries()
        if kind == "finish":
            a.finish_reason = "length" if value == "length" else "stop"
            n -= 1
            yield a, None, a._new_entries()


def usage_of(prompt_tokens: int, media, answers: list[Answer]) -> dict:
    completion_tokens = sum(a.seq.generated for a in answers)
    return {
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "media": [{"type": m.kind, "index": m.index, "grid": list(m.grid), "tokens": m.tokens,
                   "size": list(m.size), "original_size": list(m.original_size),
                   **({"frames": m.frames} if m.kind == "video" else {})} for m in media],
    }  # fmt: skip


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it is known to exceed ``limit`` bytes (header or stream)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body has {declared} bytes; --max-request-bytes is {limit}", code="body_too_large")
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise ApiError(413, f"the body exceeds --max-request-bytes ({limit})", code="body_too_large")
        chunks.append(part)
    return b"".join(chunks)


class RequestIds:
    """ASGI middleware: each HTTP request gets an id (``x-request-id`` in the answer) and its status is counted
    for /metrics. An unexpected exception is logged with that id and answered 500 in OpenAI's shape, never with
    its traceback. Plain ASGI, so streamed answers pass through untouched."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = scope["request_id"] = uuid.uuid4().hex[:16]
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.request(message["status"])
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unexpected error in request %s", rid)
            if not started:  # else the answer is cut short: the client sees a broken stream, not a traceback
                body = ApiError(500, f"internal error (request {rid})", "server_error", "internal_error").body()
                await JSONResponse(body, status_code=500)(scope, receive, send_with_id)


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, dtype: str | None = None, device: str | None = None,
          config: ServerConfig | None = None, quantize: str | None = None) -> None:  # fmt: skip
    """Load ``model`` and serve it with uvicorn until interrupted."""
    import uvicorn

    from .. import load

    config = config or ServerConfig()
    assistant = load(model, dtype=dtype, device=device, quantize=quantize)
    if config.model_name == "qwen2vl":  # not set: the directory's name, or the hub id as given
        config.model_name = Path(str(model)).name if Path(str(model)).expanduser().is_dir() else str(model)
    config.max_model_len = min(config.max_model_len, assistant.model.config.text.max_position_embeddings)
    log.info("serving %s on http://%s:%d", config.model_name, host, port)
    uvicorn.run(create_app(assistant, config), host=host, port=port, log_level="info")
