"""The fake LLM must behave like a real OpenAI-compatible server, over real HTTP."""

import json
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

import pytest
import requests

from tests.fake_llm import FakeLLM, Script, parse_args, split_words, standalone_script
from tests.helpers import ROOT, wait_until

@pytest.fixture
def llm():
    """A running fake, stopped after the test."""
    with FakeLLM() as server:
        yield server


def chat(content="hi there", stream=False, **extra):
    """A chat request body with one user message."""
    return {"model": "test-model", "messages": [{"role": "user", "content": content}], "stream": stream, **extra}


def post(llm, body, **kwargs):
    """POST a chat request with requests."""
    return requests.post(llm.url + "/chat/completions", json=body, timeout=5, **kwargs)


def sse_lines(response):
    """The non-blank lines of an event stream, as they arrive."""
    return [line for line in response.iter_lines(decode_unicode=True) if line]


def chunk_objects(lines):
    """The JSON payloads among stream lines."""
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def contents(lines):
    """The content deltas of a stream, in order, without the empty role delta."""
    deltas = [c["choices"][0]["delta"] for c in chunk_objects(lines) if c["choices"]]
    return [d["content"] for d in deltas if d.get("content")]


def readable(sock, timeout):
    """Whether the socket has bytes (or EOF) to read within timeout."""
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        return bool(selector.select(timeout))


class RawClient:
    """A bare-socket HTTP/1.1 client, for checking framing byte by byte."""

    def __init__(self, llm):
        """Connect to the fake."""
        url = urllib.parse.urlsplit(llm.url)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=5)
        self.file = self.sock.makefile("rb")

    def send(self, method, path, body=b""):
        """Send one request on this connection."""
        head = f"{method} {path} HTTP/1.1\r\nHost: fake\r\nContent-Type: application/json\r\n"
        self.sock.sendall(head.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def send_chat(self, body):
        """Send a chat request."""
        self.send("POST", "/v1/chat/completions", json.dumps(body).encode())

    def read_head(self):
        """Read a status code and lower-cased headers."""
        status = int(self.file.readline().split()[1])
        headers = {}
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, value = line.decode().split(":", 1)
            headers[name.strip().lower()] = value.strip()
        return status, headers

    def read_chunk(self):
        """Read one HTTP chunk's payload (b"" for the terminating chunk); EOFError if the connection closed."""
        line = self.file.readline()
        if not line:
            raise EOFError("connection closed mid-body")
        size = int(line.strip(), 16)
        data = self.file.read(size)
        self.file.readline()
        return data

    def read_body(self, headers):
        """Read a Content-Length body."""
        return self.file.read(int(headers["content-length"]))

    def read_until_eof(self):
        """Read everything until the server closes."""
        return self.file.read()

    def close(self):
        """Close the connection for real (the makefile holds the descriptor too)."""
        self.file.close()
        self.sock.close()


@pytest.fixture
def raw(llm):
    """A connected raw client, closed after the test."""
    client = RawClient(llm)
    yield client
    client.close()


def test_url_points_at_loopback_v1(llm):
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", llm.url)


def test_model_defaults_to_the_requested_one_or_fake_model(llm):
    assert post(llm, chat()).json()["model"] == "test-model"
    anonymous = {"messages": [{"role": "user", "content": "hi"}]}
    assert post(llm, anonymous).json()["model"] == "fake-model"


def test_models_lists_the_fake_model(llm):
    response = requests.get(llm.url + "/models", timeout=5)
    assert response.json() == {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}


def test_completion_echoes_last_message_and_counts_usage(llm):
    body = {
        "model": "test-model",
        "messages": [
            {"role": "system", "content": "be brief please"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "hi there"},
        ],
    }
    response = post(llm, body, headers={"X-Trace-Id": "abc"})

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    completion = response.json()
    assert completion["id"].startswith("chatcmpl-")
    assert completion["object"] == "chat.completion"
    assert isinstance(completion["created"], int)
    assert completion["model"] == "test-model"
    assert completion["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "echo: hi there"}, "finish_reason": "stop"}
    ]
    assert completion["usage"] == {"prompt_tokens": 3 + 1 + 2, "completion_tokens": 3, "total_tokens": 9}
    [recorded] = llm.requests
    assert recorded["json"] == body
    assert recorded["path"] == "/v1/chat/completions"
    assert recorded["headers"]["x-trace-id"] == "abc"


def test_completion_uses_scripted_reply_model_and_can_omit_usage(llm):
    llm.script(Script(reply="scripted answer", model="other-model", usage=False))
    completion = post(llm, chat()).json()
    assert completion["choices"][0]["message"]["content"] == "scripted answer"
    assert completion["model"] == "other-model"
    assert "usage" not in completion


def test_split_words_keeps_spaces_so_chunks_join_back():
    assert split_words("echo: hi there") == ["echo:", " hi", " there"]
    for text in ["echo:  two  spaces ", "\nline\nbreaks", "", "one"]:
        assert "".join(split_words(text)) == text


def test_stream_sends_role_content_stop_and_done(llm):
    response = post(llm, chat(stream=True), stream=True)

    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["Transfer-Encoding"] == "chunked"
    lines = sse_lines(response)
    chunks = chunk_objects(lines)
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
    assert contents(lines) == ["echo:", " hi", " there"]
    assert chunks[-1]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert {(c["id"], c["object"], c["model"]) for c in chunks} == {(chunks[0]["id"], "chat.completion.chunk", "test-model")}
    assert lines[-1] == "data: [DONE]"
    assert llm.disconnects == 0


def test_explicit_chunks_override_reply_splitting(llm):
    llm.script(Script(reply="ignored", chunks=["Hel", "lo", "!"]))
    assert contents(sse_lines(post(llm, chat(stream=True), stream=True))) == ["Hel", "lo", "!"]


def test_stream_usage_chunk_only_when_requested(llm):
    asked = chat(stream=True, stream_options={"include_usage": True})
    llm.script(Script(), Script(), Script(usage=False))

    with_usage = sse_lines(post(llm, asked, stream=True))
    not_asked = sse_lines(post(llm, chat(stream=True), stream=True))
    scripted_off = sse_lines(post(llm, asked, stream=True))

    usage_chunk = chunk_objects(with_usage)[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert with_usage[-1] == "data: [DONE]"
    assert all("usage" not in c for c in chunk_objects(not_asked) + chunk_objects(scripted_off))


def test_each_event_travels_in_its_own_http_chunk(llm, raw):
    llm.script(Script(chunks=["a", "b"]))
    raw.send_chat(chat(stream=True))

    status, headers = raw.read_head()
    events = list(iter(raw.read_chunk, b""))  # ends at the terminating zero-length chunk

    assert (status, headers["transfer-encoding"]) == (200, "chunked")
    assert all(e.startswith(b"data: ") and e.endswith(b"\n\n") and e.count(b"\n\n") == 1 for e in events)
    assert len(events) == 1 + 2 + 1 + 1  # role, contents, stop, [DONE]
    assert events[-1] == b"data: [DONE]\n\n"


def test_gated_raw_pieces_wait_each_for_a_release_of_their_own(llm, raw):
    llm.script(Script(raw=[b"one", b"two", b"three"], raw_gated=True))
    raw.send_chat(chat(stream=True))
    raw.read_head()

    assert raw.read_chunk() == b"one"
    assert wait_until(lambda: llm._sleepers)  # holding "two" back until a release
    llm.release()
    assert raw.read_chunk() == b"two"
    llm.release()
    assert raw.read_chunk() == b"three"
    assert raw.read_chunk() == b""


def test_comments_precede_every_event(llm, raw):
    llm.script(Script(chunks=["a"], comments=True))
    raw.send_chat(chat(stream=True))
    raw.read_head()

    pieces = list(iter(raw.read_chunk, b""))

    assert pieces[0::2] == [b": keep-alive\n\n"] * 4
    assert all(p.startswith(b"data: ") for p in pieces[1::2])


@pytest.mark.parametrize("stream", [False, True])
def test_error_status_answers_openai_error_json(llm, stream):
    llm.script(Script(status=429, retry_after="3"), Script(status=503))
    with requests.Session() as session:
        limited = session.post(llm.url + "/chat/completions", json=chat(stream=stream), timeout=5)
        unavailable = session.post(llm.url + "/chat/completions", json=chat(stream=stream), timeout=5)
        recovered = session.post(llm.url + "/chat/completions", json=chat(), timeout=5)

    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "3"
    assert limited.headers["Content-Type"] == "application/json"
    assert limited.json()["error"]["type"] == "requests"
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert limited.json()["error"]["message"]
    assert unavailable.status_code == 503
    assert "Retry-After" not in unavailable.headers
    assert unavailable.json()["error"]["type"] == "server_error"
    assert recovered.json()["choices"][0]["message"]["content"] == "echo: hi there"


def test_bad_bodies_get_400_and_leave_the_script_queue_alone(llm):
    llm.script(Script(reply="kept"))
    not_json = requests.post(llm.url + "/chat/completions", data=b"{nope", timeout=5)
    no_messages = post(llm, {"model": "test-model"})
    valid = post(llm, chat())

    assert not_json.status_code == no_messages.status_code == 400
    assert not_json.json()["error"]["type"] == "invalid_request_error"
    assert valid.json()["choices"][0]["message"]["content"] == "kept"
    assert [r["json"] for r in llm.requests[:2]] == [None, None]


def test_unknown_path_is_404(llm):
    response = requests.post(llm.url + "/completions", json=chat(), timeout=5)
    assert response.status_code == 404
    assert "error" in response.json()


def test_chunked_request_bodies_are_read(llm):
    parts = [b'{"model": "m", "messages": [{"role": "user", ', b'"content": "chunked"}]}']
    response = requests.post(llm.url + "/chat/completions", data=iter(parts), timeout=5)
    assert response.json()["choices"][0]["message"]["content"] == "echo: chunked"


def test_scripts_are_used_in_order_then_default(llm):
    llm.script(Script(reply="one"), Script(reply="two"))
    replies = [post(llm, chat()).json()["choices"][0]["message"]["content"] for _ in range(3)]
    assert replies == ["one", "two", "echo: hi there"]


def test_keep_alive_serves_many_requests_on_one_connection(llm, raw):
    raw.send_chat(chat())
    status, headers = raw.read_head()
    assert json.loads(raw.read_body(headers))["choices"][0]["message"]["content"] == "echo: hi there"

    raw.send_chat(chat(stream=True))
    raw.read_head()
    assert list(iter(raw.read_chunk, b""))[-1] == b"data: [DONE]\n\n"

    raw.send("GET", "/v1/models")
    status, headers = raw.read_head()
    assert status == 200 and json.loads(raw.read_body(headers))["data"][0]["id"] == "fake-model"


def test_requests_record_the_client_address_so_connection_reuse_shows(llm):
    with requests.Session() as session:
        for _ in range(2):
            session.post(llm.url + "/chat/completions", json=chat(), timeout=5)
    post(llm, chat())
    first, second, third = (r["client"] for r in llm.requests)
    assert first == second != third
    assert first[0] == "127.0.0.1"


@pytest.mark.parametrize("stream", [False, True])
def test_header_delay_holds_the_status_line(llm, stream):
    llm.script(Script(header_delay=0.2))
    started = time.monotonic()
    response = post(llm, chat(stream=stream), stream=True)
    assert time.monotonic() - started >= 0.2
    assert response.status_code == 200


def test_first_chunk_delay_holds_the_first_event_but_not_the_headers(llm, raw):
    llm.script(Script(first_chunk_delay=30), Script(first_chunk_delay=0.2))
    raw.send_chat(chat(stream=True))
    assert raw.read_head()[0] == 200  # the socket's 5 s timeout would fire if headers waited too
    llm.release()
    assert b'"role": "assistant"' in raw.read_chunk()

    started = time.monotonic()
    response = post(llm, chat(stream=True), stream=True)
    next(line for line in response.iter_lines() if line)
    assert time.monotonic() - started >= 0.2


def test_chunk_delay_spaces_the_content_chunks(llm):
    llm.script(Script(chunks=["a", "b", "c"], chunk_delay=0.1))
    started = time.monotonic()
    lines = sse_lines(post(llm, chat(stream=True), stream=True))
    assert contents(lines) == ["a", "b", "c"]
    assert time.monotonic() - started >= 0.2


def test_paced_chunks_leave_k_chunk_delays_after_the_first(llm):
    llm.script(Script(chunks=["a", "b", "c", "d", "e"], chunk_delay=0.05, paced=True))
    response = post(llm, chat(stream=True), stream=True)
    arrivals = [time.monotonic() for line in response.iter_lines() if contents([line.decode()])]
    assert len(arrivals) == 5
    for k, arrived in enumerate(arrivals):
        assert abs(arrived - arrivals[0] - k * 0.05) < 0.03, (k, arrived - arrivals[0])


def test_hang_sends_nothing_until_release_then_closes(llm, raw):
    llm.script(Script(hang=True), Script(hang=True))
    raw.send_chat(chat())
    assert llm.wait_for_requests(1)
    assert not readable(raw.sock, 0.1)

    llm.release()

    assert raw.read_until_eof() == b""
    # A release wakes only requests already received: the next hang still hangs.
    later = RawClient(llm)
    later.send_chat(chat())
    assert llm.wait_for_requests(2)
    assert not readable(later.sock, 0.1)
    llm.release()
    assert later.read_until_eof() == b""
    later.close()


def test_release_right_after_arrival_is_not_lost(llm):
    clients = [RawClient(llm) for _ in range(5)]
    for n, client in enumerate(clients, 1):
        llm.script(Script(hang=True))
        client.send_chat(chat(stream=True))
        assert llm.wait_for_requests(n)
        llm.release()
        assert client.read_until_eof() == b""
        client.close()
    assert llm.wait_for_idle(timeout=2)
    assert llm.disconnects == 0


def test_release_cuts_running_delays_short(llm):
    llm.script(Script(chunks=["a", "b", "c"], chunk_delay=30))
    started = time.monotonic()
    response = post(llm, chat(stream=True), stream=True)
    lines = response.iter_lines(decode_unicode=True)
    assert next(c for line in lines for c in contents([line])) == "a"

    llm.release()

    rest = [line for line in lines if line]
    assert contents(rest) == ["b", "c"] and rest[-1] == "data: [DONE]"
    assert time.monotonic() - started < 5


def test_stop_frees_hanging_and_idle_connections():
    llm = FakeLLM().start()
    llm.script(Script(hang=True))
    port = urllib.parse.urlsplit(llm.url).port
    hanging, idle = RawClient(llm), RawClient(llm)
    hanging.send_chat(chat())
    idle.send("GET", "/v1/models")
    idle.read_body(idle.read_head()[1])
    assert llm.wait_for_requests(1)

    started = time.monotonic()
    llm.stop()

    assert time.monotonic() - started < 2
    assert hanging.read_until_eof() == b""
    assert idle.read_until_eof() == b""
    hanging.close()
    idle.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1)


def test_silence_after_goes_quiet_until_release_then_drops_the_connection(llm, raw):
    llm.script(Script(chunks=["a", "b", "c"], silence_after=1))
    raw.send_chat(chat(stream=True))
    raw.read_head()
    raw.read_chunk()  # role

    assert b'"content": "a"' in raw.read_chunk()
    assert not readable(raw.sock, 0.1)
    assert llm.active_streams == 1

    llm.release()

    with pytest.raises(EOFError):
        raw.read_chunk()
    assert llm.wait_for_idle()
    assert llm.disconnects == 0


def test_break_after_cuts_the_connection_without_terminator(llm, raw):
    llm.script(Script(chunks=["a", "b", "c"], break_after=2))
    response = post(llm, chat(stream=True), stream=True)
    received = []
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for line in response.iter_lines(decode_unicode=True):
            received.append(line)
    assert contents(received) == ["a", "b"]
    assert "data: [DONE]" not in received

    llm.script(Script(chunks=["a", "b", "c"], break_after=0))
    raw.send_chat(chat(stream=True))
    raw.read_head()
    assert b'"role": "assistant"' in raw.read_chunk()
    with pytest.raises(EOFError):
        raw.read_chunk()
    assert llm.disconnects == 0


def test_garbage_after_injects_one_bad_event_and_carries_on(llm):
    llm.script(Script(chunks=["a", "b"], garbage_after=1))
    lines = sse_lines(post(llm, chat(stream=True), stream=True))
    assert lines[2] == "data: this is not json"
    assert contents(lines) == ["a", "b"]
    assert lines[-1] == "data: [DONE]"


def test_no_done_finishes_cleanly_without_the_done_line(llm, raw):
    llm.script(Script(no_done=True), Script(no_done=True))
    lines = sse_lines(post(llm, chat(stream=True), stream=True))
    assert chunk_objects(lines)[-1]["choices"][0]["finish_reason"] == "stop"
    assert "data: [DONE]" not in lines

    raw.send_chat(chat(stream=True))
    raw.read_head()
    events = list(iter(raw.read_chunk, b""))  # stops only at the terminating zero-length chunk
    assert b"[DONE]" not in b"".join(events)


def test_close_delimited_stream_has_no_framing_and_ends_with_eof(llm, raw):
    llm.script(Script(chunks=["a", "b"], close_delimited=True))
    raw.send_chat(chat(stream=True))

    status, headers = raw.read_head()
    body = raw.read_until_eof()

    assert status == 200 and headers["connection"] == "close"
    assert "transfer-encoding" not in headers and "content-length" not in headers
    events = body.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    assert all(e.startswith(b"data: ") for e in events[:-1])


def test_close_delimited_events_arrive_before_the_stream_ends(llm, raw):
    llm.script(Script(chunks=["a", "b"], close_delimited=True, silence_after=1))
    raw.send_chat(chat(stream=True))
    raw.read_head()

    assert b'"role": "assistant"' in raw.file.readline()
    raw.file.readline()
    assert b'"content": "a"' in raw.file.readline()
    assert raw.file.readline() == b"\n"

    llm.release()
    assert raw.read_until_eof() == b""


def test_client_closing_mid_stream_counts_a_disconnect(llm, raw):
    llm.script(Script(chunks=["x"] * 100, chunk_delay=0.02))
    raw.send_chat(chat(stream=True))
    raw.read_head()
    raw.read_chunk()
    assert llm.active_streams == 1

    raw.close()

    assert llm.wait_for_disconnects(1, timeout=3)
    assert llm.wait_for_idle(timeout=3)


def test_the_fake_notes_when_a_client_left_its_stream(llm, raw):
    llm.script(Script(silence_after=0))
    raw.send_chat(chat(stream=True))
    raw.read_head()
    raw.read_chunk()
    before = time.monotonic()

    raw.close()

    assert llm.wait_for_disconnects(1, timeout=3)
    assert before <= llm.disconnect_times[0] <= time.monotonic()


def test_disconnect_is_noticed_while_silent_without_release(llm, raw):
    llm.script(Script(silence_after=0))
    raw.send_chat(chat(stream=True))
    raw.read_head()
    raw.read_chunk()

    raw.close()

    assert llm.wait_for_disconnects(1, timeout=3)
    assert llm.wait_for_idle(timeout=3)


def test_disconnect_is_noticed_while_a_stream_hangs(llm, raw):
    llm.script(Script(hang=True))
    raw.send_chat(chat(stream=True))
    assert llm.wait_for_requests(1)

    raw.close()

    assert llm.wait_for_disconnects(1, timeout=3)
    assert llm.wait_for_idle(timeout=3)


def test_wait_helpers_give_up_after_their_timeout(llm):
    assert llm.wait_for_requests(1, timeout=0.05) is False
    assert llm.wait_for_disconnects(1, timeout=0.05) is False


def test_reset_forgets_scripts_requests_and_disconnects(llm, raw):
    llm.script(Script(silence_after=0))
    raw.send_chat(chat(stream=True))
    raw.read_head()
    raw.close()
    assert llm.wait_for_disconnects(1)
    llm.script(Script(reply="stale"))

    llm.reset()

    assert (llm.requests, llm.disconnects, llm.disconnect_times) == ([], 0, [])
    assert post(llm, chat()).json()["choices"][0]["message"]["content"] == "echo: hi there"


@pytest.mark.parametrize("flags, stop_signal", [(["--gevent"], signal.SIGINT), ([], signal.SIGTERM)])
def test_standalone_server_serves_until_signalled(flags, stop_signal):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "tests.fake_llm", "--port", str(port), *flags]
    command += ["--chunk-delay", "0.01", "--reply", "from the command line"]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True) as server:
        try:
            assert server.stdout.readline().strip().endswith(f"127.0.0.1:{port}/v1")
            response = requests.post(
                f"http://127.0.0.1:{port}/v1/chat/completions", json=chat(stream=True), timeout=5
            )
            assert contents(sse_lines(response)) == ["from", " the", " command", " line"]
            server.send_signal(stop_signal)
            assert server.wait(timeout=5) == 0
        finally:
            server.kill()


def standalone(*argv):
    """The script a standalone server answers with, given these command-line options."""
    return standalone_script(parse_args(list(argv)))


def test_chunks_option_streams_exactly_n_chunks_that_read_as_text():
    script = standalone("--chunks", "25", "--reply", "one two three")
    assert len(script.chunks) == 25
    assert "".join(script.chunks).split() == (["one", "two", "three"] * 9)[:25]
    assert script.chunks_for({"messages": [{"role": "user", "content": "ignored"}]}) == script.chunks


def test_first_chunk_delay_and_chunk_delay_options_reach_the_script():
    script = standalone("--first-chunk-delay", "0.2", "--chunk-delay", "0.5")
    assert (script.first_chunk_delay, script.chunk_delay, script.chunks, script.reply) == (0.2, 0.5, None, None)


def test_paced_option_reaches_the_script():
    """--paced turns on pacing; it is off by default."""
    assert standalone("--paced").paced and not standalone().paced


def test_standalone_chunks_option_works_over_http():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "tests.fake_llm", "--port", str(port), "--gevent", "--chunks", "5",
               "--first-chunk-delay", "0.01"]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True) as server:
        try:
            assert server.stdout.readline().strip().endswith(f"127.0.0.1:{port}/v1")
            response = requests.post(
                f"http://127.0.0.1:{port}/v1/chat/completions", json=chat(stream=True), timeout=5
            )
            assert len(contents(sse_lines(response))) == 5
            server.send_signal(signal.SIGINT)
            assert server.wait(timeout=5) == 0
        finally:
            server.kill()
