"""``onnxpipe serve``: an OpenAI-compatible HTTP API over one model directory (Starlette on uvicorn).

    POST /v1/completions        {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream"}
    POST /v1/chat/completions   {"model", "messages", ...}: the model's own chat template, its end-of-turn token
    GET  /v1/models             the one model served (its id: the directory's name unless --model-name)
    GET  /health                {"status": "ok", "running", "prefilling", "waiting", ...}; 503 while "starting" or
                                "shutting_down"

Streams are server-sent events in OpenAI's chunk format, ended by ``data: [DONE]``. Requests are decoded together
by the scheduler (``scheduler.py``); a client that goes away (a closed stream, or a dropped connection while it
waits) frees its place at the next step. Bad requests get 4xx with OpenAI's error body; a full queue gets 429 with
a ``Retry-After`` (``QueueWait``).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from onnxpipe.errors import OnnxpipeError
from onnxpipe.runtime.generate import GenerationResult, LanguageModel, load
from onnxpipe.serve import protocol
from onnxpipe.serve.handoff import Inbox, Mailbox
from onnxpipe.serve.protocol import ApiError
from onnxpipe.serve.scheduler import QueueFull, Request, TooLong, make_scheduler

MAX_BODY_BYTES = 4 << 20
# a body past this is turned into tokens on a worker thread, not the event loop's: a 4 MiB prompt took 2-3 s to render
# and encode, during which every stream stood still (the tokenizer releases the GIL for long texts); a smaller one
# costs the loop ~20 ms at most, less than the hop
INLINE_PREPARE_BYTES = 64 << 10
DISCONNECT_POLL_S = 0.5  # how often a waiting request checks that its client is still there
GRACEFUL_SHUTDOWN_S = 5  # on stop, open streams get this long before their connections are closed
# While the server runs, a thread holding the GIL gives it up after this long (Python's default: 5 ms). The scheduler's
# thread needs it back after every onnxruntime call, and the event loop's thread, busy with the streams, would
# otherwise keep it for up to 5 ms: one such wait per decode step was a GPU step's time again.
SWITCH_INTERVAL_S = 0.0005
MAX_RETRY_AFTER_S = 60  # a 429's Retry-After, at most (QueueWait)
REPLY_SMOOTHING = 0.1  # weight of the newest finished reply in QueueWait's average


def gc_freeze_wanted() -> bool:
    """Whether a server process leaves what it made before serving out of the garbage collector's full runs
    (``BatchLoop.freeze_gc``): yes unless ``ONNXPIPE_SERVE_GC_FREEZE`` is 0, off, false or no."""
    return os.environ.get("ONNXPIPE_SERVE_GC_FREEZE", "1").strip().lower() not in ("0", "off", "false", "no")


def create_app(lm: LanguageModel, model_name: str, *, max_batch: int = 8, max_queue: int = 64,
               prefill_chunk: int | str = "auto", max_length: int | None = None,
               prefill_group: int | None = None, chunk_graphs: bool | None = None,
               chunk_lane: bool | None = None, freeze_gc: bool = False) -> Any:
    """The ASGI app; its lifespan starts and stops the scheduler thread. ``app.state.scheduler`` is the scheduler
    (``scheduler.make_scheduler``: fixed rows of ``max_length`` tokens for a shared-buffer graph). ``freeze_gc``:
    once the scheduler has started, the process's objects so far are frozen out of the garbage collector's runs
    (process-wide: for a process that is the server, as ``onnxpipe serve``'s; ``gc_freeze_wanted``)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request as HttpRequest
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    scheduler = make_scheduler(lm, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                               max_length=max_length, prefill_group=prefill_group, chunk_graphs=chunk_graphs,
                               chunk_lane=chunk_lane)
    scheduler.freeze_gc = freeze_gc
    created = int(time.time())
    phase = "starting"  # /health's status: "ok" once the lifespan started the scheduler's thread, then "shutting_down"

    queue_wait = QueueWait(max_batch)

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def read_body(request: HttpRequest) -> bytes:
        """The body, refused with a 413 as soon as it passes MAX_BODY_BYTES: by its Content-Length before any of it
        is read, else (chunked) at the chunk that passes it, not after the whole of it is held in memory."""
        protocol.check_content_type(request.headers.get("content-type"))
        too_large = ApiError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB")
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise too_large
        chunks, read = [], 0
        async for chunk in request.stream():
            read += len(chunk)
            if read > MAX_BODY_BYTES:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def prepare(parsed: protocol.ParsedRequest, chat: bool) -> Any:
        """The request's RowState: its prompt as token ids, checked against the model's context."""
        what, subject = ("messages", "conversation") if chat else ("prompt", "prompt")
        try:
            if chat:
                ids = lm.chat_prompt(parsed.messages or [])
                options = {"stop_token_ids": lm.chat_stop_ids(), **parsed.options}  # ignore_eos: []
            else:
                ids = lm.encode(parsed.prompt) if isinstance(parsed.prompt, str) else list(parsed.prompt or [])
                options = dict(parsed.options)
        except OnnxpipeError as e:
            raise ApiError(400, str(e), what) from None
        context = scheduler.max_length  # the model's context, or the fixed rows' length
        room = context - len(ids)
        if room < 1:
            raise ApiError(400, f"This model's maximum context length is {context} tokens; the {subject} has "
                                f"{len(ids)} tokens, leaving no room for a reply", what, code="context_length_exceeded")
        if parsed.max_tokens is not None and parsed.max_tokens > room:
            raise ApiError(400, f"This model's maximum context length is {context} tokens; the {subject} has "
                                f"{len(ids)} tokens and max_tokens asks for {parsed.max_tokens} more",
                           "max_tokens", code="context_length_exceeded")
        max_tokens = parsed.max_tokens or (room if chat else min(protocol.DEFAULT_COMPLETION_TOKENS, room))
        try:
            return lm.prepare(ids, max_new_tokens=max_tokens, **options)
        except OnnxpipeError as e:
            raise ApiError(400, str(e), what) from None

    mailboxes: dict[int, Mailbox] = {}  # one per event loop (a test may run the app on several, one after another)

    def submit(row: Any) -> tuple[Request, Inbox]:
        loop = asyncio.get_running_loop()
        mailbox = mailboxes.get(id(loop))
        if mailbox is None or mailbox.loop is not loop:
            mailbox = mailboxes[id(loop)] = Mailbox(loop)
        inbox = Inbox(mailbox)
        try:
            return scheduler.submit(row, inbox.emit), inbox
        except QueueFull as e:
            raise ApiError(429, str(e), type="rate_limit_exceeded", code="rate_limit_exceeded",
                           headers={"Retry-After": str(queue_wait.seconds(scheduler.budget.step_s))}) from None
        except TooLong as e:
            raise ApiError(400, str(e), "max_tokens", code="context_length_exceeded") from None
        except OnnxpipeError as e:
            raise ApiError(503, str(e), type="server_error") from None

    def stopping() -> bool:
        """The server was asked to stop (Ctrl-C, SIGTERM, ``ServerThread.stop``): uvicorn's exit flag."""
        server = app.state.server
        return server is not None and bool(server.should_exit)

    async def next_events(request: HttpRequest, inbox: Inbox, checked: list[float]) -> list[Any] | None:
        """The request's events delivered so far (at least one), or None once its client is gone. The connection
        is looked at every DISCONNECT_POLL_S (``checked``: when it last was), events flowing or not: uvicorn drops
        what is sent to a closed connection without an error, so a stream would otherwise run to its end for
        nobody. Once the server is stopping, raises ``ServerStopping``: uvicorn waits GRACEFUL_SHUTDOWN_S for open
        responses and then cuts them mid-body, so each ends here with an error its client can read instead."""
        while True:
            if stopping():
                raise ServerStopping()
            if time.monotonic() - checked[0] >= DISCONNECT_POLL_S:
                checked[0] = time.monotonic()
                if await request.is_disconnected():
                    return None
            events = await inbox.take(DISCONNECT_POLL_S)
            if events:
                return events

    async def generate(request: HttpRequest, chat: bool) -> Any:
        try:
            raw = await read_body(request)
            parsed = protocol.parse_request(protocol.parse_json(raw), model_name, chat)
            if len(raw) <= INLINE_PREPARE_BYTES:
                row = prepare(parsed, chat)
            else:  # its template and tokens take long enough to stall every stream if read on the event loop
                row = await asyncio.get_running_loop().run_in_executor(None, prepare, parsed, chat)
            req, inbox = submit(row)
        except ApiError as e:
            return error(e)
        rid = protocol.new_id(chat)
        if parsed.stream:
            return StreamingResponse(stream(request, req, inbox, rid, chat, parsed.include_usage, len(row.prompt)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        checked = [time.monotonic()]
        try:
            while True:
                try:
                    events = await next_events(request, inbox, checked)
                except ServerStopping as e:
                    return error(e.api_error())
                if events is None:  # the client is gone: free its place
                    req.cancel()
                    return error(ApiError(499, "the client closed the request"))
                for kind, value in events:
                    if kind == "done":
                        queue_wait.finished(len(value.token_ids))
                        return JSONResponse(protocol.completion(rid, model_name, chat, value))
                    if kind == "error":
                        return error(ApiError(500, value, type="server_error"))
        finally:
            req.cancel()  # a no-op once done; frees the place if this handler was cancelled

    async def stream(request: HttpRequest, req: Request, inbox: Inbox, rid: str, chat: bool,
                     include_usage: bool, prompt_tokens: int) -> AsyncIterator[str]:
        """The SSE stream. The pieces delivered together (a stream that fell behind the decode steps) go out as one
        chunk: their texts joined, the last one's finish reason."""
        def sse(obj: Any) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        text_chunk = protocol.TextChunks(rid, model_name, chat)
        written: list[float] | None = None  # when this stream's text went to the connection, if recorded
        if app.state.stream_times is not None:
            written = []
            app.state.stream_times.append((prompt_tokens, written))

        def piece(text: str, reason: str | None) -> str:  # a text piece: most chunks, from the stream's template
            return f"data: {text_chunk(text)}\n\n" if text and not reason else sse(
                protocol.chunk(rid, model_name, chat, text, reason))

        checked = [time.monotonic()]
        try:
            if chat:
                yield sse(protocol.chunk(rid, model_name, True, "", role=True))
            finished = False
            while not finished:
                try:
                    events = await next_events(request, inbox, checked)
                except ServerStopping as e:  # an error event, then the stream's proper end
                    yield sse(e.api_error().body()) + "data: [DONE]\n\n"
                    return
                if events is None:
                    return
                text, reason, out = "", None, []
                for kind, value in events:
                    if kind == "piece":
                        text, reason = text + value.text, value.finish_reason or reason
                        continue
                    if text or reason:
                        out.append(piece(text, reason))
                        text, reason = "", None
                    if kind == "done":
                        result: GenerationResult = value
                        queue_wait.finished(len(result.token_ids))
                        if include_usage:
                            out.append(sse(protocol.chunk(rid, model_name, chat, None,
                                                          usage_=protocol.usage(prompt_tokens,
                                                                                len(result.token_ids)))))
                    else:
                        out.append(sse(ApiError(500, value, type="server_error").body()))
                    finished = True
                    break
                if text or reason:
                    out.append(piece(text, reason))
                if out:
                    yield "".join(out)  # resumed once the server has written it to the connection
                    if written is not None and any(kind == "piece" and value.text for kind, value in events):
                        written.append(time.perf_counter())
            yield "data: [DONE]\n\n"
        finally:
            req.cancel()  # the stream ended or its client went away: the place is freed at the next step

    async def completions(request: HttpRequest) -> Any:
        return await generate(request, chat=False)

    async def chat_completions(request: HttpRequest) -> Any:
        return await generate(request, chat=True)

    model_card = {"id": model_name, "object": "model", "created": created, "owned_by": "onnxpipe",
                  "max_model_len": scheduler.max_length}  # as vLLM says it: the tokens a request's prompt + reply hold

    async def models(request: HttpRequest) -> Any:
        return JSONResponse({"object": "list", "data": [model_card]})

    async def one_model(request: HttpRequest) -> Any:  # the openai client's models.retrieve(id)
        asked = request.path_params["model"]
        if asked != model_name:
            return error(ApiError(404, f"The model `{asked}` does not exist; this server serves `{model_name}`",
                                  "model", code="model_not_found"))
        return JSONResponse(model_card)

    async def health(request: HttpRequest) -> Any:
        """200 "ok" while requests are served; a 503 "starting" before the scheduler's thread has started and
        prepared (uvicorn answers nothing until then) and "shutting_down" once the server is stopping, so that a
        load balancer sends nothing then."""
        status = "shutting_down" if stopping() else phase
        return JSONResponse({"status": status, "model": model_name, **scheduler.load(), "stats": vars(scheduler.stats)},
                            status_code=200 if status == "ok" else 503)

    async def http_error(request: HttpRequest, exc: Exception) -> Any:
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind))

    async def server_error(request: HttpRequest, exc: Exception) -> Any:
        return error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        nonlocal phase
        previous = sys.getswitchinterval()
        sys.setswitchinterval(min(previous, SWITCH_INTERVAL_S))
        scheduler.start()
        # the server takes requests once the scheduler's thread has prepared (its CUDA-graph capture: seconds)
        await asyncio.get_running_loop().run_in_executor(None, scheduler.ready.wait)
        phase = "ok"
        try:
            yield
        finally:
            phase = "shutting_down"
            await asyncio.get_running_loop().run_in_executor(None, scheduler.stop)
            sys.setswitchinterval(previous)

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                            Route("/v1/models", models, methods=["GET"]),
                            Route("/v1/models/{model:path}", one_model, methods=["GET"]),
                            Route("/health", health, methods=["GET"])],
                    exception_handlers={HTTPException: http_error, Exception: server_error}, lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.server = None  # the uvicorn.Server running the app, set by whoever starts it: its exit flag ends streams
    # a caller measuring the server (the load test) sets a list: each stream then appends (its prompt's tokens, the
    # perf_counter times at which its chunks with text were written to the connection), the inter-token gaps as the
    # server made them, whatever a client's reads join
    app.state.stream_times = None
    return app


class QueueWait:
    """A 429's ``Retry-After``: whole seconds until the full queue is likely to have room, that is until one running
    request finishes and the oldest waiting one takes its place. Running requests are at staggered points of their
    replies, so a place frees about every (a reply's tokens / the batch's places) decode steps: that, times the
    measured decode step, with a reply's tokens averaged over the replies finished so far. 1 until both are measured;
    at most MAX_RETRY_AFTER_S (the ``openai`` client waits what a server says up to 60 s, and its own backoff beyond)."""

    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.reply_tokens: float | None = None  # a reply's tokens, a moving average of the finished ones

    def finished(self, tokens: int) -> None:
        new = float(max(tokens, 1))
        old = self.reply_tokens
        self.reply_tokens = new if old is None else (1 - REPLY_SMOOTHING) * old + REPLY_SMOOTHING * new

    def seconds(self, step_s: float | None) -> int:
        if step_s is None or self.reply_tokens is None:
            return 1
        return min(MAX_RETRY_AFTER_S, max(1, math.ceil(step_s * self.reply_tokens / self.max_batch)))


class ServerStopping(Exception):
    """The server is stopping: a request still open gets a 503 (or, streaming, an error event and ``[DONE]``)."""

    def api_error(self) -> ApiError:
        return ApiError(503, "the server is shutting down; the request was stopped before its end",
                        type="server_error", code="server_shutting_down")


class ServerThread:
    """The app served by uvicorn on a thread of this process (tests, the load test): ``with ServerThread(app) as s:``
    ... ``s.url`` ...; leaving the block stops the server and its scheduler."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 60.0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
        self.host, self.start_timeout = host, start_timeout
        app.state.server = self.server
        self.thread = threading.Thread(target=self.server.run, name="onnxpipe-serve", daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise OnnxpipeError(f"the server did not start on {self.host} within {self.start_timeout:.0f} s")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve_forever(model_dir: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 8000,
                  provider: str = "auto", max_batch: int = 8, max_queue: int = 64, prefill_chunk: int | str = "auto",
                  model_name: str | None = None, threads: int | None = None, cuda_graph: bool = False,
                  max_length: int | None = None, announce: Callable[[str], None] | None = None,
                  prefill_group: int | None = None, chunk_graphs: bool | None = None,
                  chunk_lane: bool | None = None) -> None:
    """``onnxpipe serve``: load the model directory and serve it until interrupted."""
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise OnnxpipeError("serving needs the [serve] extra: pip install 'onnxpipe[serve]'") from None
    # a server loads once and prefills all its life: the head at the read position only, even where that means
    # rebuilding a large single-file graph at load (its logits at every prompt position are ~20% of a
    # SmolLM2-135M prefill)
    lm = load(model_dir, provider, threads=threads, announce=announce, cuda_graph=cuda_graph, last_position=True,
              chunk_lane=bool(chunk_lane))
    name = model_name or Path(model_dir).resolve().name
    app = create_app(lm, name, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                     max_length=max_length, prefill_group=prefill_group, chunk_graphs=chunk_graphs,
                     chunk_lane=chunk_lane, freeze_gc=gc_freeze_wanted())
    if announce:
        layout = (f"{max_batch} fixed rows of {app.state.scheduler.max_length} tokens"
                  + (", CUDA graphs" if lm.session.cuda_graph else "") if lm.session.shares_buffer
                  else f"max batch {max_batch}")
        where = f"http://{host}:{port}" if port else f"http://{host} on a free port (named by the Uvicorn line below)"
        announce(f"serving {name} ({lm.provider}) on {where} ({layout}, queue {max_queue})")
        if lm.tokenizer is None or lm.tokenizer.chat_template is None:  # said once now, not only in each 400
            announce(f"{model_dir}: no chat template, so /v1/chat/completions answers 400; /v1/completions takes "
                     "plain prompts")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info",
                                           timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    app.state.server = server
    try:  # Ctrl-C or SIGTERM: open responses end with a "server_shutting_down" error, then the scheduler stops
        server.run()
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C it caught again once it has stopped
        pass
    if not server.started:
        raise OnnxpipeError(f"the server could not start on {host}:{port} (see the lines above)")
