"""The language model: an OpenAI-compatible HTTP endpoint, or the built-in demo model."""

import base64
import json
import logging
import os
import re
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit, urlunsplit

import gevent.monkey
import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter

from config import ConfigError
from errors import ApiError, ContextTooLarge, EmptyStream
from patrol import Patrol

log = logging.getLogger(__name__)
READ_SIZE = 65536
MAX_ANSWER_BYTES = 16 * 1024 * 1024
ERROR_BODY_BYTES = 65536
# The longest line of a streamed answer kept while waiting for its end.
MAX_LINE_BYTES = 4 * 1024 * 1024
# The most of a streamed answer read: a whole answer's bound four times over, since each chunk
# wraps its few characters of text in a JSON object of its own.
MAX_STREAM_BYTES = 4 * MAX_ANSWER_BYTES
LINE_BREAK = re.compile(rb"\r\n|\r|\n")
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
# The poll of the system itself, whether or not gevent patched select: a poll with a zero timeout never blocks.
NATIVE_POLL = gevent.monkey.get_original("select", "poll")
# Connections to the model kept open for reuse: as many as a worker's open streams.
KEPT_CONNECTIONS = 4096


@dataclass
class Reply:
    """What the model said and what it cost, as far as it is known."""

    content: str = ""
    model: str = ""
    prompt_tokens: int = None
    completion_tokens: int = None
    finish_reason: str = None
    chunks: list = field(default_factory=list)


# What the database cannot keep: NUL, and a surrogate that is not half of a pair.
UNKEEPABLE = re.compile("[\x00\ud800-\udfff]")
MAX_TOKEN_FIGURE = 2**31 - 1


def cleaned(text):
    """The model's text with what cannot be kept (NUL, lone surrogates) replaced by U+FFFD."""
    return UNKEEPABLE.sub("\ufffd", text)


def token_figure(value):
    """A token count the model reported, if it is a plausible whole number; else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKEN_FIGURE:
        return value
    return None


def model_name(value):
    """The model name an answer gives, if it is short text that can be kept; else None."""
    if isinstance(value, str) and 0 < len(value) <= 128:
        return cleaned(value)
    return None


def finish_reason_of(value):
    """The finish reason an answer gives, if it is a short word; else None."""
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z_-]{1,32}", value):
        return value
    return None


def estimate_tokens(text):
    """A cheap token estimate (about four characters a token) for when the model reports none."""
    return max(1, (len(text) + 3) // 4) if text else 0


# What may be a secret in the text a model server sends back: bearer tokens, API keys (OpenAI's
# sk-proj-..., Stripe-style sk_live_..., Hugging Face's hf_..., GitHub's and Slack's), the password of
# a URL (up to the last @ before its host: a password may hold @ or /), and settings written out
# (password=..., api_key: ..., client_secret=..., access_token=...). An upstream error quotes what it
# received (the Authorization header included) and its own configuration, so its text goes to the log
# only after these are masked. A URL's password is taken as at most 200 characters, so that text
# of many "a://b:" (no @) costs a bounded search at each, not one to the end of the text.
SECRETS = re.compile(
    r"(?i)(?P<scheme>(?:bearer|basic)\s+)[^\s\"',;]+"
    r"|\b(?:sk|pk|rk|key|api[-_]?key|hf|ghp|gho|github_pat|xox[abposr])[-_][A-Za-z0-9_-]{6,}"
    r"|(?P<user>\b[a-z][a-z0-9+.-]*://[^\s:/@\"']*:)[^\s\"']{1,200}(?P<host>@[^\s@/\"']*)"
    r"|(?P<setting>\b(?:[a-z0-9]+[-_]){0,3}(?:password|passwd|pwd|secret|token|api[-_]?key|apikey|access[-_]?key)"
    r"[\"']?\s*[:=]\s*[\"']?)[^\s\"'&,;)}]+")
LOGGED_BODY_CHARS = 500
# How model servers say the context is too long: OpenAI's and LiteLLM's code, the wording of
# OpenAI, vLLM and llama-cpp-python ("maximum context length"), llama.cpp's server
# ("exceeds the available context size") and others'.
CONTEXT_TOO_LONG = re.compile(r"(?i)context_length_exceeded|maximum context length|context length|"
                              r"context window|exceed_context_size|exceeds? the available context|"
                              r"prompt is too long|too many tokens")
# What says the trouble is the reply's length asked for (max_tokens), or a rate of tokens, not the
# prompt: leaving history out would not help, even where the words above appear too.
MAX_TOKENS_COMPLAINT = re.compile(r"(?i)max_tokens|max_completion_tokens")
NOT_AN_OVERFLOW = re.compile(MAX_TOKENS_COMPLAINT.pattern + r"|rate limit|per minute|per day")
HTTP_DATE = re.compile(r"[A-Za-z]{3}, \d{2} [A-Za-z]{3} \d{4} \d{2}:\d{2}:\d{2} GMT")


def masked(text, known=()):
    """`text` with anything that looks like a secret (and every `known` one) masked, cut to a bound."""
    for secret in sorted(filter(None, known), key=len, reverse=True):  # a secret holding another goes first
        text = text.replace(secret, "[masked]")
    text = SECRETS.sub(mask, text)
    return text[:LOGGED_BODY_CHARS] + ("..." if len(text) > LOGGED_BODY_CHARS else "")


def mask(found):
    """What a SECRETS match becomes: what names the secret stays (a scheme, a URL's user and host, a setting)."""
    named = found.group("scheme") or found.group("user") or found.group("setting") or ""
    return named + "[masked]" + (found.group("host") or "")


def retry_after_of(value):
    """A Retry-After worth passing on: a small number of seconds or an HTTP date, else None."""
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,5}", value) or HTTP_DATE.fullmatch(value):
        return value
    return None


def context_overflow(text):
    """Whether a model's error says the prompt does not fit its context (not that max_tokens is too large)."""
    return bool(CONTEXT_TOO_LONG.search(text)) and not NOT_AN_OVERFLOW.search(text)


def upstream_error(status, body, retry_after=None, known_secrets=()):
    """The ApiError for a model that answered with an HTTP error status.

    The caller gets our own message and the upstream status only; the upstream body goes to the
    log, masked and cut short.
    """
    log.warning("the model answered HTTP %s: %s", status, masked(body, known_secrets))
    message = f"the model answered HTTP {status}"
    if status == 429:
        retry_after = retry_after_of(retry_after)
        headers = {"Retry-After": retry_after} if retry_after else None
        return ApiError(503, "llm_rate_limited", message, headers)
    if 400 <= status < 500 and context_overflow(body):
        return ContextTooLarge()
    if status == 401 or status == 403:
        message += " (check LLM_API_KEY)"
    elif 400 <= status < 500 and MAX_TOKENS_COMPLAINT.search(body):
        message += " (check LLM_MAX_TOKENS)"
    return ApiError(502, "llm_error", message)


def unreachable(exc, timeout):
    """The ApiError for a request to the model that failed before its answer was in."""
    cause = getattr(exc, "reason", None) or exc  # urllib3 gives up with MaxRetryError(reason)
    timed_out = isinstance(cause, (urllib3.exceptions.TimeoutError, TimeoutError))
    if timed_out and not isinstance(cause, urllib3.exceptions.NewConnectionError):
        return ApiError(504, "llm_timeout", f"the model did not answer within {timeout:g} s")
    return ApiError(502, "llm_unavailable", "the model could not be reached")


def discard(response):
    """Close a response's connection and give its place back to the pool (a new one takes it)."""
    response.close()
    response.release_conn()


class ModelAdapter(HTTPAdapter):
    """requests' adapter for the model's one URL: where and how to send, worked out once.

    For every request, requests' adapter works out the connection pool, its TLS settings and
    the request target again, and wraps the answer in its Response (a cookie jar, a charset
    guessed from the headers): about a quarter of a millisecond a request under gevent
    (bench/clients.py). All of it is the same for every request to the model, so `bind` does
    it once with requests' own methods, and `post` goes straight to the pool.
    """

    def bind(self, request, verify, proxies, timeout):
        """Choose, once, the pool and target for requests like `request` (a PreparedRequest)."""
        self.pool = self.get_connection_with_tls_context(request, verify, proxies=proxies)
        self.pool.ConnectionCls = quickly_checked(self.pool.ConnectionCls)
        self.cert_verify(self.pool, request.url, verify, None)
        self.target = self.request_url(request, proxies)
        self.timeouts = urllib3.Timeout(connect=timeout, read=timeout)

    def post(self, body, headers):
        """POST `body` to the bound URL: urllib3's response, once its status line is in."""
        return self.pool.urlopen("POST", self.target, body=body, headers=headers, redirect=False,
                                 assert_same_host=False, preload_content=False, decode_content=False,
                                 retries=self.max_retries, timeout=self.timeouts)


def quickly_checked(connection_class):
    """urllib3's connection class, telling whether a kept connection is still open with a poll of the system's own.

    Before it reuses a pooled connection urllib3 polls its socket with a timeout of zero, which
    cannot block; under gevent that poll is gevent's, and takes a turn of its loop (and the
    watchers it sets up) for each request to the model.
    """
    def is_connected(connection):
        """Open, and nothing (a close, stray bytes) waiting to be read."""
        if connection.sock is None:
            return False
        poller = NATIVE_POLL()
        poller.register(connection.sock, select.POLLIN)
        return not poller.poll(0)

    return type(f"QuicklyChecked{connection_class.__name__}", (connection_class,),
                {"is_connected": property(is_connected)})


def url_secrets(url):
    """What of a URL's credentials an upstream may echo back: the password as written and decoded (an upstream
    sees `p@ss` where the URL says `p%40ss`), and the Basic header made of them."""
    parts = urlsplit(url)
    if parts.password is None:
        return ()
    userinfo = parts.netloc.rpartition("@")[0]
    return parts.password, unquote(parts.password), base64.b64encode(unquote(userinfo).encode()).decode()


def without_credentials(url):
    """The URL for showing: without any user:password it carries, nor its query string (which may hold a key)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment=""))


class OpenAIChatModel:
    """Any server that speaks OpenAI's chat-completions protocol (OpenAI, vLLM, Ollama, ...)."""

    backend = "openai-compatible"

    def __init__(self, base_url, api_key, model, timeout, max_tokens=None):
        """A client with one keep-alive session to `base_url`; replies capped at `max_tokens` if given."""
        self.url = base_url + "/chat/completions"
        self.max_tokens = max_tokens
        self.base_url = without_credentials(base_url)
        self.model = model
        self.timeout = timeout
        # Secrets an upstream error may echo back: the key, and credentials in the URL.
        self.known_secrets = url_secrets(base_url) + ((api_key,) if api_key else ())
        session = requests.Session()
        # Read the proxy and CA settings of the environment once, not on every request.
        session.trust_env = False
        proxies = requests.utils.get_environ_proxies(base_url)
        verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        session.headers["Content-Type"] = "application/json"
        if api_key:
            session.headers["Authorization"] = f"Bearer {api_key}"
        # Prepared once by the session (its headers, credentials in the URL), and bound to the
        # adapter once: every request reuses the headers with its own body. The session's
        # per-request work (preparing the URL and headers again, cookies, hooks, redirects) is
        # never needed; redirects are not followed: a chat completion is not a page that moves.
        template = session.prepare_request(requests.Request("POST", self.url))
        self.adapter = ModelAdapter(pool_connections=1, pool_maxsize=KEPT_CONNECTIONS)
        self.adapter.bind(template, verify, proxies, timeout)
        self.headers = dict(template.headers)

    def describe(self):
        """Where replies come from, for /status and the startup log (never the key)."""
        return {"backend": self.backend, "model": self.model, "base_url": self.base_url}

    def _post(self, messages, stream, **options):
        """Send the request and return the response once its status line is in."""
        body = {"model": self.model, "messages": messages, "stream": stream}
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        body.update(options)
        headers = dict(self.headers)
        if stream:
            body["stream_options"] = {"include_usage": True}
            headers["Accept-Encoding"] = "identity"
        data = json.dumps(body).encode()
        headers["Content-Length"] = str(len(data))
        try:
            response = self.adapter.post(data, headers)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise unreachable(exc, self.timeout) from None
        if response.status != 200:
            try:
                text = response.read(ERROR_BODY_BYTES, decode_content=True).decode("utf-8", "replace")
            except (urllib3.exceptions.HTTPError, OSError):
                text = ""
            discard(response)
            raise upstream_error(response.status, text, response.headers.get("Retry-After"),
                                 self.known_secrets)
        return response

    def complete(self, messages, **options):
        """The whole reply to `messages`, in one request (`options` go in its body)."""
        response = self._post(messages, stream=False, **options)
        try:
            body = response.read(MAX_ANSWER_BYTES + 1, decode_content=True)
            if len(body) > MAX_ANSWER_BYTES:
                discard(response)
                raise ApiError(502, "llm_bad_response", "the model's answer was too large")
            answer = json.loads(body)
            if reports_error(answer):
                raise reported_error(body.decode("utf-8", "replace"), self.known_secrets)
            choice = answer["choices"][0]
            if choice.get("finish_reason") == "error":
                raise reported_error(body.decode("utf-8", "replace"), self.known_secrets)
            content = choice["message"]["content"] or ""
            if not isinstance(content, str):
                raise TypeError("content is not a string")
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            discard(response)
            raise unreachable(exc, self.timeout) from None
        except (ValueError, KeyError, IndexError, TypeError, RecursionError):
            raise ApiError(502, "llm_bad_response", "the model's answer was not a chat completion") from None
        usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
        return Reply(content=cleaned(content), model=model_name(answer.get("model")) or self.model,
                     prompt_tokens=token_figure(usage.get("prompt_tokens")),
                     completion_tokens=token_figure(usage.get("completion_tokens")),
                     finish_reason=finish_reason_of(choice.get("finish_reason")))

    def fits(self, messages):
        """Whether `messages` fit the model's context: asked for one token, it does not refuse them.

        Asked twice if the connection fails: after a stream that broke off, the server may be
        closing the connection this question would reuse.
        """
        for _ in range(2):
            try:
                self.complete(messages, max_tokens=1)
            except ContextTooLarge:
                return False
            except ApiError as exc:
                if exc.code == "llm_unavailable":
                    continue
            return True  # it answered, or failed some other way: not known not to fit
        return True

    def open_stream(self, messages):
        """Start a streamed reply: raises ApiError unless the model answered 200."""
        return ReplyStream(self._post(messages, stream=True), self.model, self.timeout, self.known_secrets)


class EventDecoder:
    """Server-sent events as the WHATWG rules read them: ("data", text) or ("error", text) per event.

    Lines end in CR, LF or CRLF; a byte-order mark before the first line is dropped; `data:`
    lines are joined with newlines; an event dispatches at a blank line. An event named `error`
    (with or without data) and an `error:` field line (llama.cpp) are errors; comments and other
    fields are skipped. A line, and the data of one event, are bounded by MAX_LINE_BYTES.
    """

    def __init__(self):
        """Nothing read yet."""
        self._head = b""  # the first bytes, until they are known not to be a split byte-order mark
        self._started = False
        self._after_cr = False  # the last block ended in CR: an LF first in the next is its CRLF's
        self._partial, self._partial_bytes = [], 0  # the line not ended yet, in pieces
        self._data, self._data_bytes = [], 0
        self._event = ""
        self._error = None
        self.events = 0

    def feed(self, block):
        """The events completed by `block`, in order."""
        if self._between_events() and is_one_data_event(block):  # how nearly every chunk comes: read at once
            self.events += 1
            return [("data", block[6:-2].decode("utf-8", "replace"))]
        if not self._started:
            block = self._head + block
            if len(block) < 3 and b"\xef\xbb\xbf".startswith(block):
                self._head = block
                return []
            self._started = True
            block = block.removeprefix(b"\xef\xbb\xbf")
        if self._after_cr and block:
            block, self._after_cr = block.removeprefix(b"\n"), False
        if not block:
            return []
        self._after_cr = block.endswith(b"\r")
        *ended, rest = LINE_BREAK.split(block)
        completed = []
        if ended:
            ended[0] = b"".join(self._partial + [ended[0]])
            self._partial, self._partial_bytes = [], 0
            for line in ended:
                event = self._line(line)
                if event is not None:
                    completed.append(event)
        if rest:
            self._partial.append(rest)
            self._partial_bytes += len(rest)
            if self._partial_bytes > MAX_LINE_BYTES:
                raise ApiError(502, "llm_bad_response", "a line of the model's stream was too long")
        return completed

    def _between_events(self):
        """Whether the last block ended an event: nothing of the next one is held yet."""
        return (self._started and not self._after_cr and not self._partial and not self._data and not self._event
                and self._error is None)

    def _line(self, line):
        """Take one line; the event it completes, if any."""
        if not line:
            return self._dispatch()
        if line.startswith(b":"):
            return None
        name, _, value = line.partition(b":")
        value = value[1:] if value.startswith(b" ") else value
        if name == b"data":
            self._data_bytes += len(value) + 1
            if self._data_bytes > MAX_LINE_BYTES:
                raise ApiError(502, "llm_bad_response", "an event of the model's stream was too long")
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"error":
            self._error = value
        return None

    def _dispatch(self):
        """The event the lines so far make, and a fresh start."""
        data, event, error = self._data, self._event, self._error
        self._data, self._data_bytes, self._event, self._error = [], 0, "", None
        if error is not None:
            self.events += 1
            return "error", error.decode("utf-8", "replace")
        if not data and event != "error":  # an error said with no data is still said
            return None
        self.events += 1
        text = b"\n".join(data).decode("utf-8", "replace")
        return ("error" if event == "error" else "data"), text


def is_one_data_event(block):
    """Whether `block` is exactly one event of one `data: ` line ended by LF LF, as a whole (no CR anywhere)."""
    return (block.startswith(b"data: ") and block.find(b"\n") == len(block) - 2 and block.endswith(b"\n\n")
            and b"\r" not in block and len(block) <= MAX_LINE_BYTES)


def shut_down(sock):
    """Shut a connection to the model down from anywhere, so a read blocked on it ends at once.

    Through an https proxy, urllib3's TLS-in-TLS transport stands for the socket: its own is under it.
    """
    sock = getattr(sock, "socket", sock)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class BrokenBody(ValueError):
    """The model's body is not well-formed HTTP/1.1 chunks, or ended before its last chunk."""


class ChunkedBody:
    """A streamed answer's body in HTTP/1.1 chunks, read straight from the connection: one `recv` a block.

    urllib3's and http.client's reading of a chunked body takes about a dozen Python calls for
    every piece the model sends (a size line read, the piece, its CRLF, each through their
    buffered reader); here one `recv` brings whatever has come and the chunk framing is taken
    off it in place. A body that is not chunked is read through urllib3.
    """

    MAX_SIZE_LINE = 1024

    def __init__(self, response, timeout):
        """Read `response`'s body (a urllib3 response whose body http.client has not begun reading); a silence
        of `timeout` seconds is a socket.timeout."""
        self.response = response
        self._head = response._fp.fp  # http.client's reader: what came with the headers is in it
        self._sock = response.connection.sock
        self.timeout = timeout
        self.last_read = time.monotonic()
        self.timed_out = False
        self.given_up = False  # its stream was closed before the end: nothing to watch
        self._rest = b""
        self._left = 0  # bytes of the current chunk still to come
        self._trailers = False  # past the last chunk: its trailer lines, up to an empty one
        self._head_read = False
        self.ended = False

    @staticmethod
    def fits(response):
        """Whether `response` has a chunked body, none of it read yet, on a connection of its own."""
        body = getattr(response, "_fp", None)
        connection = getattr(response, "connection", None)
        return (getattr(body, "chunked", False) and getattr(body, "chunk_left", 0) is None
                and getattr(body, "fp", None) is not None and getattr(connection, "sock", None) is not None)

    def blocks(self):
        """Yield the body's bytes as they arrive, from where the last call left off, until its last chunk;
        BrokenBody if it is not chunks or ends before."""
        while not self.ended:
            if self._head_read:
                block = self._recv()
            else:  # what came with the headers first, then the socket alone
                block, self._head_read = self._head.read1(READ_SIZE), True  # within urllib3's read timeout
                # http.client's response is done with: closing it frees its reader's buffer (8 KB a stream) and
                # lets the connection carry the next request once the body has ended.
                self.response._fp.close()
                self.last_read = time.monotonic()
                self._sock.settimeout(None)  # the watchdog bounds the silences (urllib3 sets it again)
                WATCHDOG.watch(self)
            if not block:
                raise BrokenBody("the body ended before its last chunk")
            data = self._unframe(block)
            if data:
                yield data

    def _recv(self):
        """The next block from the socket; socket.timeout if the watchdog cut a silence short."""
        try:
            block = self._sock.recv(READ_SIZE)
        except OSError:
            if self.timed_out:
                raise socket.timeout() from None
            raise
        if not block and self.timed_out:
            raise socket.timeout()
        self.last_read = time.monotonic()
        return block

    def still_streaming(self, _, now):
        """Whether the watchdog is to go on watching: not ended or given up, and not cut for a silence just now."""
        return not (self.ended or self.given_up or self.silent_too_long(now))

    def silent_too_long(self, now):
        """Whether nothing came for longer than the timeout: if so, the connection is shut down."""
        if self.ended or now - self.last_read <= self.timeout:
            return False
        self.timed_out = True
        shut_down(self._sock)
        return True

    def _unframe(self, block):
        """The body bytes in `block` with the chunk framing taken off; an unfinished line waits for the next."""
        buffer = self._rest + block if self._rest else block
        self._rest = b""
        pieces, at, end = [], 0, len(buffer)
        while at < end and not self.ended:
            if self._left:
                taken = min(self._left, end - at)
                pieces.append(buffer[at:at + taken])
                at += taken
                self._left -= taken
                continue
            line_end = buffer.find(b"\n", at)
            if line_end < 0:
                if end - at > self.MAX_SIZE_LINE:
                    raise BrokenBody("a chunk's size line is too long")
                self._rest = buffer[at:]
                break
            line = buffer[at:line_end].strip()
            at = line_end + 1
            if self._trailers:
                self.ended = not line
            elif line:  # an empty line is the CRLF that ends a chunk's data
                size = line.split(b";", 1)[0].strip()
                if not CHUNK_SIZE.fullmatch(size):  # int() would take "-4", "0x5" or "5_5"
                    raise BrokenBody("a chunk's size is not a hexadecimal number")
                self._left = int(size, 16)
                self._trailers = self._left == 0
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)


# Cuts the streams from the model that went silent for longer than their timeout. A timeout on the
# socket would start and stop a timer for every piece the model sends; the watchdog looks at every
# open stream's last arrival five times a second instead, so a silence is cut within 0.2 s of it.
WATCHDOG = Patrol(ChunkedBody.still_streaming, tick=0.2)


def reports_error(answer):
    """Whether a JSON answer (a whole one, or a chunk) is an error report: an `error` object, or vLLM's
    top-level `{"object": "error", "message": ...}`."""
    return isinstance(answer, dict) and (answer.get("error") is not None or answer.get("object") == "error")


def reported_error(upstream_text, known_secrets=(), before_any_text=True):
    """The ApiError for an error the model reported in a 200 answer (its text goes to the log, masked).

    One that says the prompt does not fit, before any text of the reply, is ContextTooLarge:
    the same as when it is said with an HTTP 400.
    """
    log.warning("the model reported an error while answering: %s",
                masked(upstream_text, known_secrets) or "(no detail)")
    if before_any_text and context_overflow(upstream_text):
        return ContextTooLarge()
    return ApiError(502, "llm_error", "the model reported an error while answering")


class ReplyStream:
    """The chunks of a streamed reply, parsed from the model's server-sent events."""

    def __init__(self, response, model, timeout, known_secrets=()):
        """Wrap an open streaming response."""
        self.response = response
        self.timeout = timeout
        self.known_secrets = known_secrets
        self.reply = Reply(model=model)
        self.received = 0  # bytes of the body read so far
        self.said_something = False  # whether any text of the reply came
        self._guard = threading.Lock()
        self._done_with = False
        self._chunked = None  # the ChunkedBody the body is read through, once known (False: through urllib3)
        self._named = None  # the model name the last chunk gave

    def __iter__(self):
        """Yield each piece of text as the model sends it; raise ApiError if the stream breaks or reports an error."""
        decoder = EventDecoder()
        for block in self._blocks():
            for kind, payload in decoder.feed(block):
                if kind == "error":
                    raise self._reported(payload)
                if payload.strip() == "[DONE]":
                    return
                text = self._apply(payload)
                if text:
                    self.said_something = True
                    yield text
        if decoder.events == 0:
            raise EmptyStream()
        raise ApiError(502, "llm_incomplete", "the model's stream ended before it was done")

    def _blocks(self):
        """Yield bytes as they arrive, each wait bounded by the timeout, up to MAX_STREAM_BYTES in all."""
        try:
            if self._chunked is None:
                self._chunked = ChunkedBody(self.response, self.timeout) if ChunkedBody.fits(self.response) \
                    else False
            for block in self._chunked.blocks() if self._chunked else iter(self._read1, b""):
                self.received += len(block)
                if self.received > MAX_STREAM_BYTES:
                    raise ApiError(502, "llm_bad_response", "the model's streamed answer was too large")
                yield block
        except (urllib3.exceptions.ReadTimeoutError, socket.timeout, TimeoutError):
            raise ApiError(504, "llm_timeout",
                           f"the model went silent for {self.timeout:g} s") from None
        except (urllib3.exceptions.HTTPError, OSError, ValueError):
            raise ApiError(502, "llm_unavailable", "the connection to the model broke") from None

    def _read1(self):
        """What urllib3 has of a body that is not chunks (b"" at its end)."""
        return self.response.read1(READ_SIZE)

    def _apply(self, payload):
        """Record one event's usage and finish reason; return its text."""
        try:
            event = json.loads(payload)
            if reports_error(event):  # vLLM, OpenRouter: an error object in a data event
                raise self._reported(payload)
            if isinstance(event.get("usage"), dict):
                self.reply.prompt_tokens = token_figure(event["usage"].get("prompt_tokens"))
                self.reply.completion_tokens = token_figure(event["usage"].get("completion_tokens"))
            named = event.get("model")
            if named != self._named:  # every chunk names the model: look at the name when it changes
                self._named = named
                self.reply.model = model_name(named) or self.reply.model
            if not event.get("choices"):
                return ""
            choice = event["choices"][0]
            if choice.get("finish_reason") == "error":
                raise self._reported(payload)
            self.reply.finish_reason = finish_reason_of(choice.get("finish_reason")) or self.reply.finish_reason
            text = (choice.get("delta") or {}).get("content") or ""
            if not isinstance(text, str):
                raise TypeError("content is not a string")
            return cleaned(text)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
            raise ApiError(502, "llm_bad_response",
                           "the model sent a chunk that is not a chat completion chunk") from None

    def _reported(self, payload):
        """The ApiError for an error the model reported in the stream (ContextTooLarge if before any text)."""
        return reported_error(payload, self.known_secrets, before_any_text=not self.said_something)

    def finish(self):
        """After [DONE]: read the rest of the body, so the connection can carry the next turn."""
        try:
            for _ in self._blocks():
                pass
        except ApiError:
            self.close()
            return
        with self._guard:
            if not self._done_with:
                self._done_with = True
                self.response.release_conn()

    def close(self):
        """Close the connection to the model (called by whoever reads the stream)."""
        with self._guard:
            self._done_with = True
        if self._chunked:
            self._chunked.given_up = True
        discard(self.response)

    def cut(self):
        """Stop the model from anywhere: shut the connection down, so a blocked read ends at once.

        Closing the response from outside would race the reader on the same buffer; the
        reader closes it once its read fails.
        """
        with self._guard:
            if self._done_with:
                return
            sock = getattr(self.response.connection, "sock", None)
            if sock is not None:
                shut_down(sock)


class DemoModel:
    """A built-in model that answers offline, deterministically, word by word."""

    backend = "demo"
    model = "demo"

    def __init__(self, word_delay=0.05):
        """A demo model pausing `word_delay` seconds between streamed words."""
        self.word_delay = word_delay

    def describe(self):
        """Where replies come from, for /status and the startup log."""
        return {"backend": self.backend, "model": self.model,
                "note": "built-in demo model; set LLM_BASE_URL to use a real one"}

    def _reply(self, messages):
        """The deterministic reply to the last message."""
        said = messages[-1]["content"]
        text = (f"This is the built-in demo model. You said: {said} "
                f"(set LLM_BASE_URL to talk to a real model)")
        words = [w for w in text.split(" ")]
        chunks = [words[0]] + [" " + w for w in words[1:]]
        prompt = sum(estimate_tokens(m["content"]) for m in messages)
        return Reply(content=text, model=self.model, prompt_tokens=prompt,
                     completion_tokens=len(chunks), finish_reason="stop", chunks=chunks)

    def complete(self, messages):
        """The whole reply to `messages`."""
        reply = self._reply(messages)
        reply.chunks = []
        return reply

    def fits(self, messages):
        """The demo model takes any message."""
        return True

    def open_stream(self, messages):
        """A streamed reply, one word at a time."""
        return DemoStream(self._reply(messages), self.word_delay)


class DemoStream:
    """The demo model's reply, streamed word by word."""

    def __init__(self, reply, word_delay):
        """Stream `reply` with `word_delay` between words."""
        self.words = reply.chunks
        self.reply = Reply(model=reply.model, prompt_tokens=reply.prompt_tokens, completion_tokens=0,
                           finish_reason="stop")
        self.word_delay = word_delay
        self.cut_short = False

    def __iter__(self):
        """Yield each word after a short pause, until cut; the reply counts the words sent."""
        for word in self.words:
            time.sleep(self.word_delay)
            if self.cut_short:
                return
            self.reply.completion_tokens += 1
            yield word

    def finish(self):
        """Nothing to finish."""

    def close(self):
        """Nothing to close."""

    def cut(self):
        """Stop after the current word."""
        self.cut_short = True


def checked_base_url(url):
    """LLM_BASE_URL, if it is an http(s) URL with a host; ConfigError, without repeating it, if not."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("LLM_BASE_URL must start with http:// or https:// (such as https://api.openai.com/v1)")
    try:
        parts.port
    except ValueError:
        raise ConfigError("the port in LLM_BASE_URL must be a number") from None
    return url


def make_model(config):
    """The model the configuration names: a real endpoint, or the demo model."""
    if config["LLM_BASE_URL"]:
        checked_base_url(config["LLM_BASE_URL"])
    if config["LLM_BASE_URL"] and urlsplit(config["LLM_BASE_URL"]).password is not None and config["LLM_API_KEY"]:
        # requests would send the URL's credentials as Basic auth in place of the key.
        raise ConfigError("LLM_BASE_URL carries a user and password and LLM_API_KEY is set: give one of them")
    if config["LLM_BASE_URL"]:
        return OpenAIChatModel(config["LLM_BASE_URL"], config["LLM_API_KEY"], config["LLM_MODEL"],
                               config["LLM_TIMEOUT_SECONDS"], config["LLM_MAX_TOKENS"] or None)
    return DemoModel()
