"""The ASGI app (Starlette): routes, the API key, request bodies, and errors in OpenAI's shape.
Generation runs on the engine thread (gptoss_mlx/server/scheduler.py); the event loop only
parses, renders and streams, so one slow or failing request never blocks or breaks another."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hmac
import logging
import signal
import socket
import struct
import sys
import termios
import time

import anyio
import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..files import JSONProblem, lone_surrogate_problem, parse_json
from ..store import ConversationStore
from . import playground
from .chat_completions import chat_completions
from .errors import APIError, bad_request, generation_failed, refuse_named_hosts, refuse_other_origins
from .responses import ResponseStore, list_input_items, responses, retrieved
from .service import Service

log = logging.getLogger("gptoss_mlx.server")

MAX_BODY_BYTES = 64 << 20
LARGE_BODY_BYTES = 1 << 20  # parsed on a worker thread, one at a time
# JSON values a body may hold, counted by its "{", "[" and "," (those in strings too): 64 MB of "{},"
# would be 21 million dicts (8 GB, and a minute of the GIL, every client's stream frozen), of "1,"
# 33 million ints (5 GB); a conversation that fits a context has far fewer (its prose a few commas
# a line)
MAX_JSON_VALUES = 1 << 21
# On shutdown, how long a response may take to end once its generation has stopped (a client
# that reads no more holds its stream open until then).
SHUTDOWN_GRACE_S = 1.0
# On shutdown, how long generations have to stop: at the engine's next step, which is a chunk of
# prefill when a long prompt is going in (seconds). Ctrl-C again ends the wait.
STOP_WAIT_S = 30.0
# A streaming client that keeps its connection but reads nothing for this long loses its stream
# (and its slot: --max-concurrency such clients would otherwise make every request a 429).
STALLED_CLIENT_S = 60.0
# A request (its headers and body) must have arrived this long after it began: the connection, or
# its first byte after the last response (idle keep-alive connections: uvicorn's 5 s).
REQUEST_READ_S = 60.0


def _body_of(raw: bytes) -> dict:
    """A request's JSON object, or the 400 saying what is wrong with it."""
    try:
        body = parse_json(raw, finite=True)
    except JSONProblem as e:
        raise bad_request(f"the request body holds no JSON value: {e}") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    problem = lone_surrogate_problem(body)  # it could not be echoed back as UTF-8
    if problem:
        raise bad_request(f"the request body's {problem}")
    return body


def create_app(service: Service, api_key: str | None = None, chats: ConversationStore | None = None) -> Starlette:
    """``chats``: the saved conversations the playground at ``/`` lists and saves (the TUI's
    store by default)."""
    store = ResponseStore()
    started = int(time.time())
    parsing = anyio.Lock()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' "
                           "(the key given to gptoss-mlx serve --api-key)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def json_body(request: Request) -> dict:
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MB")
        raw = bytearray()
        try:
            async for chunk in request.stream():  # sent in chunks, without a length: capped as it comes
                raw += chunk
                if len(raw) > MAX_BODY_BYTES:
                    raise APIError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MB")
        except ClientDisconnect:  # (its answer goes nowhere: the line in the log is what remains)
            raise APIError(400, "the client left before its request body had come whole") from None
        values = raw.count(b"{") + raw.count(b"[") + raw.count(b",")  # (C loops: milliseconds for 64 MB)
        if values > MAX_JSON_VALUES:
            raise APIError(413, f"the request body has {values:,} of the characters {{, [ and , (those in "
                           f"strings too): at most {MAX_JSON_VALUES:,}, as a bound on the JSON values it holds")
        # a large body is read off the event loop: the other clients' streams go on meanwhile
        if len(raw) < LARGE_BODY_BYTES:
            return _body_of(bytes(raw))
        async with parsing:  # one at a time: each holds the GIL, and memory several times its size
            return await anyio.to_thread.run_sync(_body_of, bytes(raw))

    async def admitted(request: Request, handler, *args):
        """Run ``handler`` in a scheduler slot, held until its response (or stream) has ended."""
        checked(request)
        refuse_other_origins(request, "this server")
        body = await json_body(request)
        slot = await service.scheduler.admit()
        try:
            response = await handler(*args, body, request)
        except BaseException as e:
            slot.release()
            if isinstance(e, Exception) and not isinstance(e, (APIError, HTTPException)):
                # a failure in the model: a 500 in OpenAI's shape, the connection stays open
                raise generation_failed(e, f"{request.method} {request.url.path}") from None
            raise
        if not isinstance(response, StreamingResponse):
            slot.release()
            return response
        response.body_iterator = _released_after(response.body_iterator, slot)
        return ReadInTime(response)

    async def post_chat(request: Request):
        return await admitted(request, chat_completions, service)

    async def post_responses(request: Request):
        return await admitted(request, responses, service, store)

    def model_object() -> dict:
        return {"id": service.model_name, "object": "model", "created": started, "owned_by": "openai"}

    def checked(request: Request) -> None:
        """What every route of the API checks before its own work (the key, the Host)."""
        authorize(request)
        refuse_named_hosts(request, api_key)

    async def models(request: Request):
        checked(request)
        return JSONResponse({"object": "list", "data": [model_object()]})

    async def model(request: Request):
        checked(request)
        service.check_model({"model": request.path_params["model"]})
        return JSONResponse(model_object())

    async def stored_response(request: Request):
        checked(request)
        response_id = request.path_params["response_id"]
        if request.method == "DELETE":
            store.delete(response_id)
            return JSONResponse({"id": response_id, "object": "response", "deleted": True})
        return JSONResponse(retrieved(store, response_id, request.query_params))

    async def stored_input_items(request: Request):
        checked(request)
        items = store.input_items(request.path_params["response_id"])
        return JSONResponse(list_input_items(items, request.query_params))

    async def cancel(request: Request):
        """POST /v1/responses/{id}/cancel: OpenAI's is for background responses, which this
        server does not make; a response under way ends when its client leaves or DELETEs it."""
        checked(request)
        refuse_other_origins(request, "this server")
        store.response(request.path_params["response_id"])  # a 404 for an unknown id, as OpenAI's
        raise bad_request("only a response created with background=true can be cancelled, and this server "
                          "makes none: close the stream, or DELETE /v1/responses/{id} while it runs",
                          code="invalid_request")

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": service.model_name,
                             "requests_in_flight": service.scheduler.in_flight})

    async def api_error(request: Request, exc: APIError):
        log.info("%s %s: %d %s", request.method, request.url.path, exc.status, exc.message)
        return exc.response()

    async def http_error(request: Request, exc: HTTPException):
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                        code="not_found" if exc.status_code == 404 else None).response()

    async def server_error(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return APIError(500, f"the server failed: {type(exc).__name__}: {exc}", type="server_error",
                        code="server_error").response()

    return Starlette(
        routes=[Route("/v1/chat/completions", post_chat, methods=["POST"]),
                Route("/v1/responses", post_responses, methods=["POST"]),
                Route("/v1/responses/{response_id}", stored_response, methods=["GET", "DELETE"]),
                Route("/v1/responses/{response_id}/input_items", stored_input_items, methods=["GET"]),
                Route("/v1/responses/{response_id}/cancel", cancel, methods=["POST"]),
                Route("/v1/models", models), Route("/v1/models/{model:path}", model),
                Route("/health", health),
                *playground.routes(service, chats or ConversationStore(), api_key, authorize, json_body)],
        exception_handlers={APIError: api_error, HTTPException: http_error, Exception: server_error})


class ClientStalled(Exception):
    """A streaming client took nothing for STALLED_CLIENT_S."""


STALL_POLL_S = 0.5  # how often a send held up by its client checks that the client takes some


class ReadInTime:
    """A streamed response whose client must keep reading: when a chunk waits to be sent and the
    client takes nothing of what waits for it for STALLED_CLIENT_S, the stream ends, and the
    generation and the slot with it, and the connection is dropped. A client that reads slowly,
    but reads, keeps its stream (the whole send was timed: a tester's slow reader, one event a
    second, was dropped as if it read nothing)."""

    def __init__(self, response: StreamingResponse):
        self.response = response

    async def __call__(self, scope, receive, send) -> None:
        connection = ReadLimited.serving(scope.get("client"))

        async def send_in_time(message) -> None:
            if connection is None:  # (not served by ReadLimited) the send as a whole is timed
                try:
                    with anyio.fail_after(STALLED_CLIENT_S):
                        return await send(message)
                except TimeoutError:  # an OSError, which Starlette would take for a disconnect
                    raise ClientStalled from None
            sending = asyncio.ensure_future(send(message))
            try:
                idle, waiting = 0.0, connection.waiting_bytes()
                while not (await asyncio.wait({sending}, timeout=STALL_POLL_S))[0]:
                    now = connection.waiting_bytes()
                    idle = 0.0 if now < waiting else idle + STALL_POLL_S  # fewer: the client took some
                    waiting = now
                    if idle >= STALLED_CLIENT_S:
                        raise ClientStalled
                return sending.result()
            finally:
                sending.cancel()

        try:
            await self.response(scope, receive, send_in_time)
        except ClientStalled:
            log.info("%s: the client read nothing for %.0f s: its stream is ended", scope.get("path"),
                     STALLED_CLIENT_S)
            if connection is not None:  # what waits for it goes, and its descriptor with it
                connection.transport.abort()
        finally:
            await self.response.body_iterator.aclose()


async def _released_after(chunks, slot):
    """The stream's chunks as UTF-8 bytes (nothing left for Starlette to fail on while the slot
    is held), releasing the slot when the stream ends, however it ends."""
    try:
        async for chunk in chunks:
            yield chunk.encode("utf-8", "replace") if isinstance(chunk, str) else chunk
    finally:
        slot.release()
        await chunks.aclose()


def serve(service: Service, host: str, port: int, api_key: str | None = None, sock=None) -> None:
    """Serve the app on ``host:port`` (or on ``sock``, a socket bound to it) until SIGTERM or
    Ctrl-C, then end promptly (see Server)."""
    config = server_config(create_app(service, api_key=api_key), host, port)
    Server(config, service).run(sockets=[sock] if sock is not None else None)


def server_config(app: Starlette, host: str, port: int) -> uvicorn.Config:
    """uvicorn's settings for the app: h11 with a time limit for reading requests (ReadLimited),
    whatever else is installed (httptools, which uvicorn would prefer, lets one request's headers
    grow without bound)."""
    return uvicorn.Config(app, host=host, port=port, http=ReadLimited, log_level="warning",
                          timeout_graceful_shutdown=SHUTDOWN_GRACE_S)


UNSENT_BYTES = 16 << 10  # the kernel's share of what waits for a client (TCP_NOTSENT_LOWAT)
SO_NWRITE = 0x1024  # macOS: bytes in a socket's send buffer (sys/socket.h; not in Python's socket)


def _bound_unsent_bytes(transport) -> None:
    """A client that stops reading holds up the stream after about UNSENT_BYTES in the kernel
    and the transport's 64 KB, where STALLED_CLIENT_S starts to count (ReadInTime), not after the
    kernel's send buffer (up to 4 MB on Linux: a slow stream's minutes, a tester's, while the
    client held a slot). Bytes sent and not yet acknowledged do not count: a client far away
    is not slowed."""
    sock = transport.get_extra_info("socket")
    option = getattr(socket, "TCP_NOTSENT_LOWAT", None)
    if sock is not None and option is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, option, UNSENT_BYTES)


class ReadLimited(H11Protocol):
    """uvicorn's h11 connection, with REQUEST_READ_S to send each request whole. Without a limit
    a client held a connection (a descriptor, and on macOS there are 256 by default) for ever by
    sending nothing, or a byte a minute: hundreds of them could take every one. Such a client gets
    a 408 in OpenAI's error shape (unless it sent nothing, or its response has begun) and the
    connection is closed."""

    _open: dict[tuple, "ReadLimited"] = {}  # by the client's (host, port), as ASGI's scope names it

    @classmethod
    def serving(cls, client) -> "ReadLimited | None":
        """The connection of the client an ASGI scope names (``scope["client"]``), if open."""
        return cls._open.get(tuple(client)[:2]) if client else None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.read_timer, self.sent_some = None, False
        self._time_the_request()
        _bound_unsent_bytes(transport)
        peer = transport.get_extra_info("peername")
        self._peer = tuple(peer)[:2] if isinstance(peer, tuple) else None
        if self._peer is not None:
            ReadLimited._open[self._peer] = self

    def waiting_bytes(self) -> int:
        """Bytes written and not yet taken by the client: in the transport's buffer, and in the
        kernel's (unsent, or sent and not acknowledged) where it says; they go down only as the
        client reads."""
        waiting = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if sys.platform.startswith("linux"):  # SIOCOUTQ
                waiting += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
            elif sys.platform == "darwin":
                waiting += sock.getsockopt(socket.SOL_SOCKET, SO_NWRITE)
        return waiting

    def data_received(self, data: bytes) -> None:
        self.sent_some = True
        super().data_received(data)
        self._time_the_request()

    def on_response_complete(self) -> None:
        self.sent_some = bool(self.conn.trailing_data[0])
        super().on_response_complete()
        self._time_the_request()

    def connection_lost(self, exc) -> None:
        self._stop_timer()
        if getattr(self, "_peer", None) is not None and ReadLimited._open.get(self._peer) is self:
            del ReadLimited._open[self._peer]
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse (a negative or doubled Content-Length, a bad chunk, a CR in a
        header, TLS on this plain port): OpenAI's error shape, not uvicorn's plain text. A response
        under way on the connection (a request after it, pipelined, is the bad one) is cut off."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self.transport.close()
            return
        body = APIError(400, "the request is not valid HTTP/1.1: its framing or headers are malformed",
                        code="invalid_request").response().body
        self.transport.write(self.conn.send(h11.Response(status_code=400, reason=b"Bad Request", headers=[
            (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), (b"connection", b"close")])))
        self.transport.write(self.conn.send(h11.Data(data=body)))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()

    def _time_the_request(self) -> None:
        """The timer runs while a request is partly read: from its first byte (or the connection)
        until its end. An idle connection between requests has uvicorn's keep-alive timer."""
        reading = self.conn.their_state is h11.SEND_BODY or (
            self.conn.their_state is h11.IDLE and (self.timeout_keep_alive_task is None or self.conn.trailing_data[0]))
        if not reading or self.transport.is_closing():
            self._stop_timer()
        elif self.read_timer is None:
            self.read_timer = self.loop.call_later(REQUEST_READ_S, self._too_slow)

    def _stop_timer(self) -> None:
        if self.read_timer is not None:
            self.read_timer.cancel()
            self.read_timer = None

    def _too_slow(self) -> None:
        self.read_timer = None
        if self.transport.is_closing():
            return
        log.info("a client sent no whole request in %.0f s: its connection is closed", REQUEST_READ_S)
        # (a response under way to this request: closed quietly; a kept-alive connection's cycle
        # is still the last request's, whose response was sent: h11's state tells)
        if self.sent_some and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            error = APIError(408, f"the request did not arrive whole within {REQUEST_READ_S:.0f} s",
                             code="request_timeout").response()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n" % len(error.body) + error.body)
        if self.cycle is not None:
            self.cycle.keep_alive = False
        self.transport.close()


class Server(uvicorn.Server):
    """uvicorn's server, ending promptly with requests in flight: on SIGTERM or Ctrl-C their
    generations stop at their next step and a tool the server runs for them is not waited for
    (each client gets a 503 saying so, in its stream when it streams), a response still unsent
    SHUTDOWN_GRACE_S after that is cut off, and the process exits normally (uvicorn would raise
    the signal again, killing the process by it)."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service

    async def shutdown(self, sockets=None) -> None:
        scheduler = self.service.scheduler
        log.info("stopping%s", ": the replies under way end now, each client is told"
                 if scheduler.running else "")
        scheduler.close()
        if self.service.tools is not None:
            self.service.tools.close()  # --functions' worker processes
        deadline = time.monotonic() + STOP_WAIT_S
        while scheduler.running and not self.force_exit and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # each client is sent its 503 once its generation stops
        await super().shutdown(sockets)
        log.info("stopped")

    @contextlib.contextmanager
    def capture_signals(self):
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
