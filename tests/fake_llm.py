"""A scriptable stand-in for an OpenAI-compatible LLM: a real HTTP/1.1 server on loopback.

Tests queue `Script`s that make the next chat requests slow, failing, hanging or
broken mid-stream; everything else in the suite talks to it over real sockets.
Standard library only, so it runs inside the unpatched pytest process too.

Standalone, for curl checks and benchmarks:
    python -m tests.fake_llm --port 8001 [--chunk-delay 0.05] [--reply TEXT] [--gevent]
        [--chunks N] [--first-chunk-delay 0.2] [--paced]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import gzip
import http.server
import json
import re
import selectors
import signal
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
import uuid

HOST = "127.0.0.1"
DEFAULT_MODEL = "fake-model"
CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
KEEP_ALIVE_COMMENT = b": keep-alive\n\n"
GARBAGE_EVENT = b"data: this is not json\n\n"
DONE_EVENT = b"data: [DONE]\n\n"
LAST_CHUNK = b"0\r\n\r\n"
ERROR_KINDS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


@dataclasses.dataclass
class Script:
    """How the fake answers one chat request."""

    reply: str | None = None
    chunks: list[str] | None = None
    status: int = 200
    retry_after: str | None = None
    header_delay: float = 0
    first_chunk_delay: float = 0
    chunk_delay: float = 0
    # Content chunk k leaves k * chunk_delay after the first, however late the one before it went
    # out: a model's token rate does not wait for its writer, so lateness does not add up.
    paced: bool = False
    hang: bool = False
    silence_after: int | None = None
    break_after: int | None = None
    garbage_after: int | None = None
    no_done: bool = False
    comments: bool = False
    usage: bool = True
    model: str | None = None
    close_delimited: bool = False
    gzip: bool = False
    error_message: str | None = None
    usage_value: object = None
    raw: list[bytes] | None = None
    raw_delay: float = 0
    # Each raw piece after the first waits for a release() of its own, so a test can see what the
    # client made of one piece before the next is sent.
    raw_gated: bool = False

    def text_for(self, request: dict) -> str:
        """The full reply text for this request."""
        if self.reply is not None:
            return self.reply
        if self.chunks is not None:
            return "".join(self.chunks)
        return "echo: " + message_text(request["messages"][-1].get("content"))

    def chunks_for(self, request: dict) -> list[str]:
        """The content pieces to stream for this request."""
        if self.chunks is not None:
            return list(self.chunks)
        return split_words(self.text_for(request))

    def model_for(self, request: dict) -> str:
        """The model name to report back."""
        return self.model or request.get("model") or DEFAULT_MODEL


class ClientGone(ConnectionError):
    """The client went away while its response was being written or awaited."""


def split_words(text: str) -> list[str]:
    """Split text into words that carry their leading whitespace, so joining restores it."""
    return [part for part in re.split(r"(?<=\S)(?=\s)", text) if part]


def message_text(content) -> str:
    """Plain text of a message content: a string or a list of OpenAI content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def parse_chat_request(body: bytes) -> tuple[dict | None, str | None]:
    """Decode a chat request body into (request, None), or (None, what is wrong with it)."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, "We could not parse the JSON body of your request."
    if not isinstance(request, dict):
        return None, "The request body must be a JSON object."
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return request, "'messages' must be a non-empty array of message objects."
    return request, None


def envelope(kind: str, script: Script, request: dict) -> dict:
    """The fields every completion object of `kind` carries: a fresh id, the time and the model."""
    return {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": kind, "created": int(time.time()),
            "model": script.model_for(request)}


def usage_for(request: dict, completion_tokens: int) -> dict:
    """Token usage with whitespace words standing in for tokens."""
    prompt_tokens = sum(max(1, len(message_text(m.get("content")).split())) for m in request["messages"])
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def wants_stream_usage(request: dict) -> bool:
    """Whether a streaming request asked for a final usage chunk."""
    options = request.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def error_body(status: int, message: str) -> dict:
    """An OpenAI-style error payload for a status code."""
    kind, code = ERROR_KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def sse(payload: dict) -> bytes:
    """One server-sent event carrying a JSON payload."""
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


class _Bell:
    """A socket pair whose ear turns readable when rung, so a select() can wait on it too."""

    def __init__(self):
        """Open the socket pair."""
        self.ear, self._clapper = socket.socketpair()
        self.ear.setblocking(False)

    def ring(self) -> None:
        """Wake whoever is selecting on the ear."""
        with contextlib.suppress(OSError):
            self._clapper.send(b"!")

    def hush(self) -> None:
        """Swallow pending rings so the next wait starts quiet."""
        with contextlib.suppress(OSError):
            while self.ear.recv(64):
                pass

    def close(self) -> None:
        """Release both sockets."""
        self.ear.close()
        self._clapper.close()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves one client connection (several requests with keep-alive)."""

    protocol_version = "HTTP/1.1"
    server_version = "FakeLLM/1.0"
    # Each SSE event must leave at once, not wait for Nagle to batch it.
    disable_nagle_algorithm = True
    _bell: _Bell | None = None
    _chunked = False
    _releases_seen = 0

    @property
    def llm(self) -> FakeLLM:
        """The FakeLLM this connection belongs to."""
        return self.server.llm

    def handle(self) -> None:
        """Serve requests until the client, a script or stop() ends the connection."""
        if not self.llm._admit(self.connection):
            return
        try:
            super().handle()
        finally:
            self.llm._dismiss(self.connection)
            if self._bell:
                self._bell.close()

    def log_message(self, format, *args) -> None:
        """Stay quiet: pytest output should not carry a line per request."""

    def do_GET(self) -> None:
        """Serve the model list; nothing else is readable."""
        if self.path.split("?")[0] == MODELS_PATH:
            self._send_json(200, {"object": "list", "data": [{"id": DEFAULT_MODEL, "object": "model"}]})
        else:
            self._send_error(404, f"Unknown path {self.path}")

    def do_POST(self) -> None:
        """Record a chat request and answer it as the next script says."""
        body = self._read_body()
        # An absolute URL as the target is what a forward proxy receives: the fake can stand in for one.
        path = urllib.parse.urlsplit(self.path).path
        if path != CHAT_PATH:
            self._send_error(404, f"Unknown path {self.path}")
            return
        request, problem = parse_chat_request(body)
        headers = {name.lower(): value for name, value in self.headers.items()}
        recorded = None if problem else request
        script, self._releases_seen = self.llm._receive(path, self.path, headers, recorded, self.client_address)
        if problem:
            self._send_error(400, problem)
        else:
            self._respond(script, request)

    def _read_body(self) -> bytes:
        """Read the request body, whether length-delimited or chunked."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked_body()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        return self.rfile.read(length)

    def _read_chunked_body(self) -> bytes:
        """Decode a chunked request body, trailers included."""
        parts = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            parts.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        return b"".join(parts)

    def _respond(self, script: Script, request: dict) -> None:
        """Answer a valid chat request, noting streams the client abandoned."""
        streaming = request.get("stream") is True
        try:
            with self.llm._streaming() if streaming else contextlib.nullcontext():
                self._answer(script, request, streaming)
        except ClientGone:
            self.close_connection = True
            if streaming:
                self.llm._count_disconnect()

    def _answer(self, script: Script, request: dict, streaming: bool) -> None:
        """Hang, delay, fail, or reply whole or as a stream."""
        if script.hang:
            self._wait(None)
            self._cut()
            return
        self._wait(script.header_delay)
        if script.status != 200:
            self._send_error(script.status, script.error_message or f"Scripted failure with status {script.status}",
                             script.retry_after)
        elif script.raw is not None:
            self._send_raw(script, streaming)
        elif streaming:
            self._stream(script, request)
        else:
            self._complete(script, request)

    def _complete(self, script: Script, request: dict) -> None:
        """Send the whole reply as one chat.completion object."""
        text = script.text_for(request)
        completion = {
            **envelope("chat.completion", script, request),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        }
        if script.usage:
            completion["usage"] = usage_for(request, len(text.split()))
        if script.usage_value is not None:
            completion["usage"] = script.usage_value
        if script.gzip and "gzip" in self.headers.get("Accept-Encoding", ""):
            self._send_json(200, completion, compress=True)
        else:
            self._send_json(200, completion)

    def _stream(self, script: Script, request: dict) -> None:
        """Send the reply as server-sent events, misbehaving where the script says."""
        chunks = script.chunks_for(request)
        meta = envelope("chat.completion.chunk", script, request)
        self._start_stream(script.close_delimited)
        self._wait(script.first_chunk_delay)
        self._emit(script, sse({**meta, "choices": [_choice({"role": "assistant", "content": ""})]}))
        first_at = time.monotonic()
        for sent in range(len(chunks) + 1):
            if sent == script.garbage_after:
                self._emit(script, GARBAGE_EVENT)
            if sent == script.break_after:
                self._cut()
                return
            if sent == script.silence_after:
                self._wait(None)
                self._cut()
                return
            if sent == len(chunks):
                break
            if sent:
                self._wait(first_at + sent * script.chunk_delay - time.monotonic() if script.paced
                           else script.chunk_delay)
            self._emit(script, sse({**meta, "choices": [_choice({"content": chunks[sent]})]}))
        self._emit(script, sse({**meta, "choices": [_choice({}, "stop")]}))
        if script.usage and wants_stream_usage(request):
            usage = usage_for(request, len(chunks)) if script.usage_value is None else script.usage_value
            self._emit(script, sse({**meta, "choices": [], "usage": usage}))
        if not script.no_done:
            self._emit(script, DONE_EVENT)
        if self._chunked:
            self._send(LAST_CHUNK)

    def _send_raw(self, script: Script, streaming: bool) -> None:
        """Send the scripted bytes exactly, each piece in its own HTTP chunk (a real server's quirks)."""
        if streaming:
            self._start_stream(script.close_delimited)
            for number, piece in enumerate(script.raw):
                if number:
                    self._wait(None if script.raw_gated else script.raw_delay)
                if script.raw_gated:
                    self._releases_seen = self.llm._release_count()  # the next piece waits for a later one
                self._write_body(piece)
            if self._chunked:
                self._send(LAST_CHUNK)
            return
        data = b"".join(script.raw)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self._end_headers()
        self._send(data)

    def _start_stream(self, close_delimited: bool) -> None:
        """Send the headers of an event stream, chunked or delimited by closing."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        if close_delimited:
            self.send_header("Connection", "close")
        else:
            self.send_header("Transfer-Encoding", "chunked")
        self._end_headers()
        self._chunked = not close_delimited

    def _emit(self, script: Script, event: bytes) -> None:
        """Write one event (after a keep-alive comment if scripted), each in its own HTTP chunk."""
        if script.comments:
            self._write_body(KEEP_ALIVE_COMMENT)
        self._write_body(event)

    def _write_body(self, data: bytes) -> None:
        """Write part of a stream body in the current framing."""
        if self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self._send(data)

    def _send_json(self, status: int, payload: dict, headers: dict | None = None, compress: bool = False) -> None:
        """Send a complete JSON response with a Content-Length (gzip-compressed if `compress`)."""
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if compress:
            data = gzip.compress(data)
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self._end_headers()
        self._send(data)

    def _send_error(self, status: int, message: str, retry_after: str | None = None) -> None:
        """Send an OpenAI-style error response."""
        self._send_json(status, error_body(status, message), {"Retry-After": retry_after} if retry_after else None)

    def _end_headers(self) -> None:
        """Flush the status line and headers."""
        try:
            self.end_headers()
        except OSError as error:
            raise ClientGone from error

    def _send(self, data: bytes) -> None:
        """Write bytes to the client right away."""
        try:
            self.wfile.write(data)
        except OSError as error:
            raise ClientGone from error

    def _cut(self) -> None:
        """Drop the connection mid-response, as a crashing upstream would."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _wait(self, seconds: float | None) -> None:
        """Sit out a scripted delay (None: until release/stop); raise ClientGone if the client leaves."""
        if not self._pause(seconds):
            raise ClientGone

    def _pause(self, seconds: float | None) -> bool:
        """Wait for the delay, a release or stop; False if the client left meanwhile."""
        if seconds is not None and seconds <= 0:
            return not self._client_left()
        if self._bell is None:
            self._bell = _Bell()
        with self.llm._asleep(self._bell, self._releases_seen) as may_sleep:
            if not may_sleep:
                return True
            try:
                return self._watch(seconds)
            finally:
                self._bell.hush()

    def _watch(self, seconds: float | None) -> bool:
        """Select on the bell and the client until the deadline; False if the client hung up."""
        deadline = None if seconds is None else time.monotonic() + seconds
        with selectors.DefaultSelector() as selector:
            selector.register(self._bell.ear, selectors.EVENT_READ)
            selector.register(self.connection, selectors.EVENT_READ)
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return True
                ready = {key.fileobj for key, _ in selector.select(remaining)}
                if self._bell.ear in ready:
                    return True
                if self.connection in ready:
                    if self._client_left():
                        return False
                    # Bytes of a pipelined request, not a hang-up: only time or a ring can end this wait.
                    selector.unregister(self.connection)

    def _client_left(self) -> bool:
        """Whether the client has closed its end (EOF or reset waiting on the socket)."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.connection, selectors.EVENT_READ)
            if not selector.select(0):
                return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


def _choice(delta: dict, finish_reason: str | None = None) -> dict:
    """The single choice of a streamed chunk."""
    return {"index": 0, "delta": delta, "finish_reason": finish_reason}


class _Server(http.server.ThreadingHTTPServer):
    """A threaded HTTP server that knows its FakeLLM."""

    daemon_threads = True
    # Benchmarks open thousands of streams at once.
    request_queue_size = 1024

    def __init__(self, llm: FakeLLM, port: int):
        """Bind loopback on port (0: any free port)."""
        self.llm = llm
        super().__init__((HOST, port), _Handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse-DNS lookup, which can stall in sandboxes."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address) -> None:
        """Ignore clients that vanish; report real bugs."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class FakeLLM:
    """A loopback OpenAI-compatible chat server that tests script request by request."""

    def __init__(self, default: Script | None = None, port: int = 0):
        """Prepare, without starting, a fake answering unscripted requests with default."""
        self.default = default or Script()
        self.port = port
        self._cond = threading.Condition()
        self._queue: collections.deque[Script] = collections.deque()
        self._requests: list[dict] = []
        self._disconnects = 0
        self._disconnected_at: list[float] = []
        self._active_streams = 0
        self._connections: set[socket.socket] = set()
        self._sleepers: set[_Bell] = set()
        self._releases = 0
        self._stopping = False
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FakeLLM:
        """Start serving for the duration of a with block."""
        return self.start()

    def __exit__(self, *exc_info) -> None:
        """Stop serving."""
        self.stop()

    @property
    def url(self) -> str:
        """The OpenAI base URL clients should use."""
        if self._server is None:
            raise RuntimeError("FakeLLM is not started")
        return f"http://{HOST}:{self._server.server_port}/v1"

    @property
    def requests(self) -> list[dict]:
        """The chat requests received so far (a snapshot)."""
        with self._cond:
            return list(self._requests)

    @property
    def disconnects(self) -> int:
        """Streams the client abandoned before they finished."""
        with self._cond:
            return self._disconnects

    @property
    def disconnect_times(self) -> list[float]:
        """When (time.monotonic()) each abandoned stream's client left, in order."""
        with self._cond:
            return list(self._disconnected_at)

    @property
    def active_streams(self) -> int:
        """Streaming requests being answered right now."""
        with self._cond:
            return self._active_streams

    def start(self) -> FakeLLM:
        """Bind loopback and serve from a daemon thread."""
        self._stopping = False
        self._server = _Server(self, self.port)
        self._thread = threading.Thread(target=self._serve, name="fake-llm", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Shut down: wake every waiting handler, stop accepting and close every connection."""
        if self._server is None:
            return
        with self._cond:
            self._stopping = True
            self._ring_sleepers()
        self._poke()
        self._thread.join(timeout=5)
        self._server.server_close()
        with self._cond:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            self._cond.wait_for(lambda: not self._connections, timeout=5)
        self._server = None

    def script(self, *scripts: Script) -> None:
        """Queue behaviours for the next chat requests, in order."""
        with self._cond:
            self._queue.extend(scripts)

    def reset(self) -> None:
        """Forget queued scripts, recorded requests and the disconnects."""
        with self._cond:
            self._queue.clear()
            self._requests.clear()
            self._disconnects = 0
            self._disconnected_at.clear()
            self._cond.notify_all()

    def release(self) -> None:
        """Wake every handler hanging or silent; requests already received stop waiting at all."""
        with self._cond:
            # A counter, not just a ring: a request recorded but not yet paused must not miss it.
            self._releases += 1
            self._ring_sleepers()

    def wait_for_requests(self, n: int, timeout: float = 10) -> bool:
        """Wait until at least n chat requests have arrived."""
        return self._wait_until(lambda: len(self._requests) >= n, timeout)

    def wait_for_disconnects(self, n: int, timeout: float = 10) -> bool:
        """Wait until at least n streams have been abandoned by their clients."""
        return self._wait_until(lambda: self._disconnects >= n, timeout)

    def wait_for_idle(self, timeout: float = 10) -> bool:
        """Wait until no stream is being answered."""
        return self._wait_until(lambda: self._active_streams == 0, timeout)

    def _wait_until(self, predicate, timeout: float) -> bool:
        """Block on the condition until predicate holds or timeout passes."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def _serve(self) -> None:
        """Accept connections until stop()."""
        while not self._stopping:
            self._server.handle_request()

    def _poke(self) -> None:
        """Connect once so the accept loop wakes up and sees it must stop."""
        with contextlib.suppress(OSError):
            socket.create_connection(self._server.server_address, timeout=1).close()

    def _ring_sleepers(self) -> None:
        """Wake every paused handler; caller holds the condition."""
        for bell in self._sleepers:
            bell.ring()

    def _release_count(self) -> int:
        """How many times release() was called."""
        with self._cond:
            return self._releases

    def _admit(self, connection: socket.socket) -> bool:
        """Track a new connection so stop() can close it; refuse it when stopping."""
        with self._cond:
            if self._stopping:
                return False
            self._connections.add(connection)
            return True

    def _dismiss(self, connection: socket.socket) -> None:
        """Forget a finished connection."""
        with self._cond:
            self._connections.discard(connection)
            self._cond.notify_all()

    def _receive(self, path: str, target: str, headers: dict, request: dict | None,
                 client: tuple) -> tuple[Script, int]:
        """Record a chat request (target: as sent; client: its peer address); hand out its script and the release count."""
        with self._cond:
            self._requests.append({"json": request, "headers": headers, "path": path, "target": target,
                                   "client": client})
            script = self._queue.popleft() if request is not None and self._queue else self.default
            self._cond.notify_all()
            return script, self._releases

    @contextlib.contextmanager
    def _asleep(self, bell: _Bell, releases_seen: int):
        """Register a pausing handler so release()/stop() can ring it; yields False if already released."""
        with self._cond:
            if self._stopping or self._releases != releases_seen:
                may_sleep = False
            else:
                self._sleepers.add(bell)
                may_sleep = True
        try:
            yield may_sleep
        finally:
            with self._cond:
                self._sleepers.discard(bell)

    @contextlib.contextmanager
    def _streaming(self):
        """Count a stream as active while it is answered."""
        with self._cond:
            self._active_streams += 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._active_streams -= 1
                self._cond.notify_all()

    def _count_disconnect(self) -> None:
        """Note a stream its client abandoned (stop() cutting streams does not count)."""
        with self._cond:
            if not self._stopping:
                self._disconnects += 1
                self._disconnected_at.append(time.monotonic())
                self._cond.notify_all()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The standalone server's command-line options."""
    parser = argparse.ArgumentParser(prog="python -m tests.fake_llm", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--chunk-delay", type=float, default=0)
    parser.add_argument("--reply", default=None, help="reply text (default: echo the last message)")
    parser.add_argument("--chunks", type=int, default=None,
                        help="stream exactly N content chunks: the reply's words (or filler words) repeated")
    parser.add_argument("--first-chunk-delay", type=float, default=0,
                        help="seconds between a stream's headers and its first event")
    parser.add_argument("--paced", action="store_true",
                        help="keep content chunk k at k * chunk-delay after the first, however late the last went")
    parser.add_argument("--gevent", action="store_true", help="monkey-patch with gevent for thousands of streams")
    args = parser.parse_args(argv)
    if args.chunks is not None and args.chunks < 1:
        parser.error("--chunks must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    """Serve standalone until Ctrl-C or SIGTERM, for manual curl checks and benchmarks."""
    args = parse_args(argv)
    if args.gevent:
        from gevent import monkey

        monkey.patch_all()
    llm = FakeLLM(standalone_script(args), port=args.port)
    stop_requested = _stop_on_signals(args.gevent)
    llm.start()
    print(f"fake LLM serving {llm.url}", flush=True)
    try:
        stop_requested.wait()
    except KeyboardInterrupt:
        pass
    finally:
        llm.stop()


FILLER = "The quick brown fox jumps over the lazy dog while the model keeps on talking."


def standalone_script(args: argparse.Namespace) -> Script:
    """The one script a standalone server answers every request with, from its command line."""
    script = Script(reply=args.reply, chunk_delay=args.chunk_delay, first_chunk_delay=args.first_chunk_delay,
                    paced=args.paced)
    if args.chunks is not None:
        words = split_words(args.reply or FILLER)
        # Every word after the first carries a leading space, so the chunks join back into text.
        script.chunks = [words[0]] + [word if word[:1].isspace() else " " + word
                                      for word in (words[i % len(words)] for i in range(1, args.chunks))]
        script.reply = None
    return script


def _stop_on_signals(use_gevent: bool) -> threading.Event:
    """Arrange for SIGINT and SIGTERM to end main(); returns the event they set under gevent."""
    stop_requested = threading.Event()
    if use_gevent:
        import gevent

        # A plain handler would raise in whichever greenlet happens to run (often a stream), not in main.
        for signum in (signal.SIGINT, signal.SIGTERM):
            gevent.signal_handler(signum, stop_requested.set)
    else:
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    return stop_requested


if __name__ == "__main__":
    main()
