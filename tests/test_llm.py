"""The model client against a real OpenAI-compatible HTTP server on loopback."""

import json
import logging
import re
import socket
import threading
import time
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from errors import ApiError
from llm import ChunkedBody, DemoModel, OpenAIChatModel, masked
from tests.helpers import MODEL_API_KEY, free_port
from tests.fake_llm import Script

HELLO = [{"role": "user", "content": "hello"}]


def streamed(model, messages=HELLO):
    """The chunks and the final reply of a streamed answer."""
    stream = model.open_stream(messages)
    chunks = list(stream)
    stream.finish()
    return chunks, stream.reply


def test_complete_returns_content_and_usage(model, llm):
    """A non-streamed answer gives its text, model and token counts."""
    llm.script(Script(reply="one two three", model="m-1"))
    reply = model.complete(HELLO)
    assert (reply.content, reply.model, reply.completion_tokens, reply.prompt_tokens) == (
        "one two three", "m-1", 3, 1)


def test_complete_reads_a_gzip_compressed_answer(model, llm):
    """A server that compresses its JSON answer (as proxies in front of models do) is understood."""
    llm.script(Script(reply="squeezed reply", gzip=True))
    assert model.complete(HELLO).content == "squeezed reply"
    assert "gzip" in llm.requests[-1]["headers"]["accept-encoding"]


def test_requests_go_through_the_proxy_the_environment_names(monkeypatch, llm):
    """http_proxy is honoured: the request reaches the proxy (the fake stands in) with the model's absolute URL."""
    proxy = llm.url.rsplit("/v1", 1)[0]
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, proxy)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    model = OpenAIChatModel("http://model.example/v1", None, "fake-model", timeout=1)
    llm.script(Script(reply="via the proxy"))
    assert model.complete(HELLO).content == "via the proxy"
    assert llm.requests[-1]["target"] == "http://model.example/v1/chat/completions"


def test_requests_carry_model_messages_and_key(model, llm):
    """The request names the model, carries the messages and the API key as a bearer token."""
    model.complete(HELLO)
    request = llm.requests[-1]
    assert request["path"] == "/v1/chat/completions"
    assert request["json"]["model"] == "fake-model"
    assert request["json"]["messages"] == HELLO
    assert request["json"]["stream"] is False
    assert request["headers"]["authorization"] == f"Bearer {MODEL_API_KEY}"


def test_stream_yields_chunks_and_usage(model, llm):
    """A streamed answer yields each chunk and ends with the usage the server reported."""
    llm.script(Script(chunks=["a", "b", "c"]))
    chunks, reply = streamed(model)
    assert chunks == ["a", "b", "c"]
    assert (reply.completion_tokens, reply.prompt_tokens, reply.finish_reason) == (3, 1, "stop")


def test_stream_ignores_sse_comments(model, llm):
    """Comment lines the model server sends (keep-alives) are not content."""
    llm.script(Script(chunks=["x", "y"], comments=True))
    assert streamed(model)[0] == ["x", "y"]


def test_stream_reads_a_body_delimited_by_closing(model, llm):
    """A stream without chunked encoding (ended by closing the connection) is read as it comes."""
    llm.script(Script(chunks=["p", "q"], close_delimited=True))
    assert streamed(model)[0] == ["p", "q"]


def test_turns_reuse_one_connection_to_the_model(model, llm):
    """Consecutive turns go over one kept-alive connection."""
    for _ in range(3):
        streamed(model)
        model.complete(HELLO)
    assert len({r["client"] for r in llm.requests}) == 1


@pytest.mark.parametrize("script, code", [
    (Script(status=500), "llm_error"),
    (Script(status=401), "llm_error"),
    (Script(status=404), "llm_error"),
])
def test_error_status_is_a_502(model, llm, script, code):
    """An upstream error status is our 502, whatever it was (an upstream 401 is not the client's)."""
    llm.script(script)
    with pytest.raises(ApiError) as raised:
        model.open_stream(HELLO)
    assert (raised.value.status, raised.value.code) == (502, code)
    assert str(script.status) in raised.value.message


def test_rate_limit_is_a_503_with_retry_after(model, llm):
    """An upstream 429 is our 503, passing Retry-After on."""
    llm.script(Script(status=429, retry_after="12"))
    with pytest.raises(ApiError) as raised:
        model.complete(HELLO)
    assert (raised.value.status, raised.value.code) == (503, "llm_rate_limited")
    assert raised.value.headers == {"Retry-After": "12"}


def test_no_answer_in_time_is_a_504(model, llm):
    """A model that never answers is a 504 after LLM_TIMEOUT_SECONDS."""
    llm.script(Script(hang=True))
    with pytest.raises(ApiError) as raised:
        model.open_stream(HELLO)
    assert (raised.value.status, raised.value.code) == (504, "llm_timeout")


def test_silence_between_chunks_is_a_timeout(model, llm):
    """A model that goes silent mid-stream for longer than the timeout ends the stream with llm_timeout."""
    llm.script(Script(chunks=["a", "b"], silence_after=1))
    stream = model.open_stream(HELLO)
    received = []
    with pytest.raises(ApiError) as raised:
        for chunk in stream:
            received.append(chunk)
    assert received == ["a"]
    assert raised.value.code == "llm_timeout"


def test_unreachable_model_is_a_502(llm):
    """Nobody listening at LLM_BASE_URL is a 502 llm_unavailable."""
    model = OpenAIChatModel(f"http://127.0.0.1:{free_port()}/v1", None, "m", timeout=1)
    with pytest.raises(ApiError) as raised:
        model.complete(HELLO)
    assert (raised.value.status, raised.value.code) == (502, "llm_unavailable")


@pytest.mark.parametrize("script, code", [
    (Script(chunks=["a", "b"], break_after=1), "llm_unavailable"),
    (Script(chunks=["a", "b"], garbage_after=1), "llm_bad_response"),
    (Script(chunks=["a", "b"], no_done=True), "llm_incomplete"),
])
def test_broken_stream_raises_after_the_good_chunks(model, llm, script, code):
    """A stream that breaks, sends garbage or ends without [DONE] raises after what came before."""
    llm.script(script)
    received = []
    with pytest.raises(ApiError) as raised:
        for chunk in model.open_stream(HELLO):
            received.append(chunk)
    assert received == ["a"] if code != "llm_incomplete" else received == ["a", "b"]
    assert raised.value.code == code


def test_describe_never_shows_the_key(model):
    """What /status shows of the model names the backend and model, not the API key."""
    assert MODEL_API_KEY not in repr(model.describe())
    assert model.describe()["model"] == "fake-model"


def test_demo_model_streams_word_by_word():
    """The demo model answers offline, deterministically, one word a chunk."""
    demo = DemoModel(word_delay=0)
    chunks = list(demo.open_stream(HELLO))
    assert len(chunks) > 3 and "".join(chunks) == demo.complete(HELLO).content
    assert "hello" in demo.complete(HELLO).content


def test_describe_hides_credentials_in_the_base_url():
    """A base URL with user:password shows without them."""
    model = OpenAIChatModel("https://user:hunter2@llm.example/v1", None, "m", timeout=1)
    assert model.describe()["base_url"] == "https://llm.example/v1"


def chunked_body(blocks, timeout=60, first_wait=0):
    """A ChunkedBody over `blocks` as the socket would give them (the first as what came with the headers, after
    `first_wait` seconds: the model reading the prompt)."""
    blocks = list(blocks)
    closed = []

    def first(size):
        """What came with the headers, once the model began its answer."""
        time.sleep(first_wait)
        return blocks.pop(0) if blocks else b""

    head = SimpleNamespace(read1=first)
    sock = SimpleNamespace(recv=lambda size: blocks.pop(0) if blocks else b"", settimeout=lambda seconds: None,
                           shutdown=lambda how: None)
    response = SimpleNamespace(_fp=SimpleNamespace(fp=head, close=lambda: closed.append(True)),
                               connection=SimpleNamespace(sock=sock))
    return ChunkedBody(response, timeout=timeout), closed


def framed(pieces, extension=b"", trailers=b""):
    """`pieces` as an HTTP/1.1 chunked body."""
    return b"".join(b"%x%s\r\n%s\r\n" % (len(p), extension, p) for p in pieces) + b"0\r\n" + trailers + b"\r\n"


@given(st.lists(st.binary(min_size=1, max_size=40), max_size=8), st.data())
def test_a_chunked_body_split_anywhere_reads_back_whole(pieces, data):
    """However the framed body is cut into blocks, its bytes come back whole, and the body ends at its last chunk."""
    body = framed(pieces, extension=data.draw(st.sampled_from([b"", b";name=value"])),
                  trailers=data.draw(st.sampled_from([b"", b"X-Trailer: yes\r\n"])))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(body) - 1)), max_size=10)))
    blocks = [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)]) if body[a:b]]
    reader, closed = chunked_body(blocks + [b"never read"])
    assert b"".join(reader.blocks()) == b"".join(pieces)
    assert reader.ended and closed == [True]


def test_a_chunked_body_read_again_goes_on_where_it_left_off():
    """A reader that stops mid-body (at [DONE]) and reads again later loses nothing in between."""
    reader, closed = chunked_body([framed([b"one", b"two", b"three"])[:9], framed([b"one", b"two", b"three"])[9:]])
    first = reader.blocks()
    assert next(first) == b"one"
    first.close()
    assert b"".join(reader.blocks()) == b"twothree" and closed == [True]


@pytest.mark.parametrize("blocks", [
    pytest.param([b"zz\r\nabc\r\n"], id="size not hex"),
    pytest.param([b"3\r\nabc\r\n", b""], id="ends before the last chunk"),
    pytest.param([b"1" * 2000], id="size line too long"),
    *[pytest.param([size + b"\r\nabcde\r\n0\r\n\r\n"], id=f"size {size.decode()}")
      for size in (b"-4", b"+5", b"0x5", b"5_5", b" ")],
])
def test_a_body_that_is_not_chunks_is_broken(blocks):
    """What is not HTTP/1.1 chunks, or stops before the last one, is a BrokenBody, never a hang or a wrong reply."""
    reader, _ = chunked_body(blocks)
    with pytest.raises(ValueError):
        b"".join(reader.blocks())


def test_describe_leaves_out_the_query_string_of_the_base_url():
    """A base URL's query string (which may carry a key) is not shown, nor its credentials."""
    model = OpenAIChatModel("https://user:hunter2@llm.example/v1?api-version=2024-06-01&key=s3cr3t", None, "m",
                            timeout=1)
    assert model.describe()["base_url"] == "https://llm.example/v1"


# What an upstream's error text may quote, the secret in it, and what of the text stays readable.
SECRET_TEXTS = {
    "url-password-with-at": ("could not connect to postgres://admin:hun@ter2@db.internal:5432/llm", "ter2",
                             "postgres://admin:[masked]@db.internal:5432/llm"),
    "url-password-with-slash": ("mysql://u:p/ss@h:3306 refused", "p/ss", "mysql://u:[masked]@h:3306 refused"),
    "password-query-parameter": ("login?password=hunter2&user=bob failed", "hunter2", "user=bob failed"),
    "api-key-setting": ("api_key=abc123def456 is not valid", "abc123def456", "is not valid"),
    "secret-setting": ("client_secret: s3cr3t-value, scope x", "s3cr3t-value", "scope x"),
    "token-setting": ("token=tok_0123456789 expired", "tok_0123456789", "expired"),
    "password-in-json": ('{"password": "hunter2", "user": "bob"}', "hunter2", '"user": "bob"'),
    "stripe-style-key": ("Incorrect API key provided: sk_live_0123456789abcdef.", "0123456789abcdef",
                         "Incorrect API key provided"),
    "project-key": ("key sk-proj-AbCdEf0123456789xyz is revoked", "AbCdEf0123456789xyz", "is revoked"),
    "hugging-face-token": ("hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345 lacks access", "AbCdEfGhIjKlMnOpQrStUvWxYz012345",
                           "lacks access"),
    "bearer-header": ("got Authorization: Bearer eyJhbGciOi.eyJzdWIi.c2lnbmF0dXJl", "eyJhbGciOi",
                      "got Authorization: Bearer"),
}


@pytest.mark.parametrize("text,secret,kept", SECRET_TEXTS.values(), ids=SECRET_TEXTS.keys())
def test_an_upstream_text_is_logged_with_its_secrets_masked(text, secret, kept):
    """Every form of secret an upstream may quote is masked; the rest of its text stays to read."""
    logged = masked(text)
    assert secret not in logged and "[masked]" in logged
    assert kept in logged


def test_the_configured_url_password_is_masked_as_the_upstream_decodes_it(llm, caplog):
    """LLM_BASE_URL's password, percent-encoded in the URL, is masked in the form an upstream echoes: decoded."""
    url = llm.url.replace("://", "://bob:p%40ss%2Fw0rd@")
    llm.script(Script(status=401, error_message="user bob, password p@ss/w0rd: refused"))
    with caplog.at_level(logging.WARNING, logger="llm"), pytest.raises(ApiError):
        OpenAIChatModel(url, None, "m", timeout=1).complete(HELLO)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "refused" in logged and "p@ss/w0rd" not in logged and "p%40ss" not in logged


def test_the_wait_for_the_first_piece_is_not_counted_as_a_silence():
    """The model reading a long prompt before its first piece (under the read timeout) does not shorten the
    silence allowed before the next one."""
    reader, _ = chunked_body([b"5\r\nfirst\r\n"], timeout=0.2, first_wait=0.3)
    assert next(reader.blocks()) == b"first"
    assert not reader.ended and not reader.silent_too_long(time.monotonic())


class ClosingServer:
    """A model server on loopback that answers each connection's first request whole, then closes it (as a server
    whose keep-alive has run out): the connections it accepted and whether the last is closed."""

    ANSWER = json.dumps({"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}).encode()

    def __init__(self):
        """Listen, and answer in a thread of its own."""
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1"
        self.accepted, self.closed = 0, threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        """Answer one request a connection, then close it."""
        while True:
            connection, _ = self.listener.accept()
            self.accepted += 1
            self.closed.clear()
            with connection:
                head = b""
                while b"\r\n\r\n" not in head:
                    head += connection.recv(65536)
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                body = head.split(b"\r\n\r\n", 1)[1]
                while len(body) < length:
                    body += connection.recv(65536)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                                   b"Connection: keep-alive\r\n\r\n%s" % (len(self.ANSWER), self.ANSWER))
            self.closed.set()


def test_a_kept_connection_the_model_closed_is_not_reused():
    """A connection the model's server closed while it was kept is seen closed before a request goes on it."""
    server = ClosingServer()
    model = OpenAIChatModel(server.url, None, "m", timeout=5)
    assert model.complete(HELLO).content == "hi"
    assert server.closed.wait(5)  # on loopback its close has reached the client's socket by now
    assert model.complete(HELLO).content == "hi"
    assert server.accepted == 2
