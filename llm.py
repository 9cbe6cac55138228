"""The language model: an OpenAI-compatible HTTP endpoint, or the built-in demo model."""

import base64
import itertools
import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit, urlunsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter

from config import ConfigError
from errors import ApiError, ContextTooLarge, EmptyStream

log = logging.getLogger(__name__)
READ_SIZE = 65536
MAX_ANSWER_BYTES = 16 * 1024 * 1024
ERROR_BODY_BYTES = 65536
# The longest line of a streamed answer kept while waiting for its end.
MAX_LINE_BYTES = 4 * 1024 * 1024
LINE_BREAK = re.compile(rb"\r\n|\r|\n")
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


def upstream_error(status, body, retry_after=None, known_secrets=()):
    """The ApiError for a model that answered with an HTTP error status.

    The caller gets our own message and the upstream status only; the upstream body goes to the
    log, masked and cut short.
    """
    log.warning("the model answered HTTP %s: %s", status, masked(body, known_secrets))
    message = f"the model answered HTTP {status}"
    if 400 <= status < 500 and CONTEXT_TOO_LONG.search(body):
        return ContextTooLarge()
    if status == 429:
        retry_after = retry_after_of(retry_after)
        headers = {"Retry-After": retry_after} if retry_after else None
        return ApiError(503, "llm_rate_limited", message, headers)
    if status == 401 or status == 403:
        message += " (check LLM_API_KEY)"
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
        self.cert_verify(self.pool, request.url, verify, None)
        self.target = self.request_url(request, proxies)
        self.timeouts = urllib3.Timeout(connect=timeout, read=timeout)

    def post(self, body, headers):
        """POST `body` to the bound URL: urllib3's response, once its status line is in."""
        return self.pool.urlopen("POST", self.target, body=body, headers=headers, redirect=False,
                                 assert_same_host=False, preload_content=False, decode_content=False,
                                 retries=self.max_retries, timeout=self.timeouts)


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

    def complete(self, messages):
        """The whole reply to `messages`, in one request."""
        response = self._post(messages, stream=False)
        try:
            body = response.read(MAX_ANSWER_BYTES + 1, decode_content=True)
            if len(body) > MAX_ANSWER_BYTES:
                discard(response)
                raise ApiError(502, "llm_bad_response", "the model's answer was too large")
            answer = json.loads(body)
            if isinstance(answer, dict) and answer.get("error") is not None:
                raise stream_error(json.dumps(answer["error"]), self.known_secrets)
            choice = answer["choices"][0]
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
                discard(self._post(messages, stream=False, max_tokens=1))
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
    and an `error:` field line (llama.cpp) are errors; comments and other fields are skipped.
    """

    def __init__(self):
        """Nothing read yet."""
        self._buffer = b""
        self._started = False
        self._data = []
        self._event = ""
        self._error = None
        self.events = 0

    def feed(self, block):
        """The events completed by `block`, in order."""
        buffer = self._buffer + block
        if not self._started:
            if len(buffer) < 3 and b"\xef\xbb\xbf".startswith(buffer):
                self._buffer = buffer
                return []
            self._started = True
            buffer = buffer.removeprefix(b"\xef\xbb\xbf")
        if len(buffer) > MAX_LINE_BYTES and not LINE_BREAK.search(buffer):
            raise ApiError(502, "llm_bad_response", "a line of the model's stream was too long")
        if buffer.endswith(b"\r"):  # maybe the first half of a CRLF: keep it for the next block
            lines = LINE_BREAK.split(buffer[:-1])
            self._buffer = lines.pop() + b"\r"
        else:
            lines = LINE_BREAK.split(buffer)
            self._buffer = lines.pop()
        completed = []
        for line in lines:
            event = self._line(line)
            if event is not None:
                completed.append(event)
        return completed

    def close(self):
        """The events the end of the body completes (a CR held back as a possible CRLF ends its line)."""
        held, self._buffer = self._buffer, b""
        return self.feed(held[:-1] + b"\n") if held.endswith(b"\r") else []

    def _line(self, line):
        """Take one line; the event it completes, if any."""
        if not line:
            return self._dispatch()
        if line.startswith(b":"):
            return None
        name, _, value = line.partition(b":")
        value = value[1:] if value.startswith(b" ") else value
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"error":
            self._error = value
        return None

    def _dispatch(self):
        """The event the lines so far make, and a fresh start."""
        data, event, error = self._data, self._event, self._error
        self._data, self._event, self._error = [], "", None
        if error is not None:
            self.events += 1
            return "error", error.decode("utf-8", "replace")
        if not data:
            return None
        self.events += 1
        text = b"\n".join(data).decode("utf-8", "replace")
        return ("error" if event == "error" else "data"), text


def stream_error(upstream_text, known_secrets=()):
    """The ApiError for an error the model reported inside its stream (its text goes to the log, masked)."""
    log.warning("the model reported an error mid-stream: %s", masked(upstream_text, known_secrets))
    return ApiError(502, "llm_error", "the model reported an error while answering")


class ReplyStream:
    """The chunks of a streamed reply, parsed from the model's server-sent events."""

    def __init__(self, response, model, timeout, known_secrets=()):
        """Wrap an open streaming response."""
        self.response = response
        self.timeout = timeout
        self.known_secrets = known_secrets
        self.reply = Reply(model=model)
        self._guard = threading.Lock()
        self._done_with = False

    def __iter__(self):
        """Yield each piece of text as the model sends it; raise ApiError if the stream breaks or reports an error."""
        decoder = EventDecoder()
        for block in itertools.chain(self._blocks(), [None]):
            for kind, payload in (decoder.feed(block) if block is not None else decoder.close()):
                if kind == "error":
                    raise stream_error(payload, self.known_secrets)
                if payload.strip() == "[DONE]":
                    return
                text = self._apply(payload)
                if text:
                    yield text
        if decoder.events == 0:
            raise EmptyStream()
        raise ApiError(502, "llm_incomplete", "the model's stream ended before it was done")

    def _blocks(self):
        """Yield bytes as they arrive, each wait bounded by the timeout."""
        try:
            while True:
                block = self.response.read1(READ_SIZE)
                if not block:
                    return
                yield block
        except (urllib3.exceptions.ReadTimeoutError, socket.timeout, TimeoutError):
            raise ApiError(504, "llm_timeout",
                           f"the model went silent for {self.timeout:g} s") from None
        except (urllib3.exceptions.HTTPError, OSError, ValueError):
            raise ApiError(502, "llm_unavailable", "the connection to the model broke") from None

    def _apply(self, payload):
        """Record one event's usage and finish reason; return its text."""
        try:
            event = json.loads(payload)
            if event.get("error") is not None:  # vLLM, OpenRouter: an error object in a data event
                raise stream_error(payload, self.known_secrets)
            if isinstance(event.get("usage"), dict):
                self.reply.prompt_tokens = token_figure(event["usage"].get("prompt_tokens"))
                self.reply.completion_tokens = token_figure(event["usage"].get("completion_tokens"))
            self.reply.model = model_name(event.get("model")) or self.reply.model
            if not event.get("choices"):
                return ""
            choice = event["choices"][0]
            if choice.get("finish_reason") == "error":
                raise stream_error(payload, self.known_secrets)
            self.reply.finish_reason = finish_reason_of(choice.get("finish_reason")) or self.reply.finish_reason
            text = (choice.get("delta") or {}).get("content") or ""
            if not isinstance(text, str):
                raise TypeError("content is not a string")
            return cleaned(text)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
            raise ApiError(502, "llm_bad_response",
                           "the model sent a chunk that is not a chat completion chunk") from None

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
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


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


def make_model(config):
    """The model the configuration names: a real endpoint, or the demo model."""
    if config["LLM_BASE_URL"] and urlsplit(config["LLM_BASE_URL"]).password is not None and config["LLM_API_KEY"]:
        # requests would send the URL's credentials as Basic auth in place of the key.
        raise ConfigError("LLM_BASE_URL carries a user and password and LLM_API_KEY is set: give one of them")
    if config["LLM_BASE_URL"]:
        return OpenAIChatModel(config["LLM_BASE_URL"], config["LLM_API_KEY"], config["LLM_MODEL"],
                               config["LLM_TIMEOUT_SECONDS"], config["LLM_MAX_TOKENS"] or None)
    return DemoModel()
