"""What an attacker and a stalled client found, each closed: on gunicorn + gevent, PostgreSQL and Redis."""

import json
import re
import socket
import time

import pytest
import requests

import auth
from tests.helpers import REDIS_URL, assert_error, bearer, cursor_of, stored_messages, token, wait_until
from tests.fake_llm import Script
from tests.sse_client import data_events

BIG_CHUNKS = [("x" * 40000) + f" {n}" for n in range(300)]  # 12 MB: more than any socket buffer holds



def raw_request(service, method, path, body=b"", headers=None, receive_buffer=None):
    """A connected socket that has sent one whole request (and reads nothing yet).

    The body's Content-Length is sent unless `headers` gives it as None.
    """
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", service.port))
    headers = {"Content-Length": len(body), **(headers or {})}
    lines = [f"{method} {path} HTTP/1.1", "Host: test",
             *[f"{name}: {value}" for name, value in headers.items() if value is not None], "", ""]
    sock.sendall("\r\n".join(lines).encode() + body)
    return sock


def raw_answer(sock, timeout=10):
    """The (status, JSON body) the server answered on `sock`, read until it closes the connection."""
    sock.settimeout(timeout)
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def closed_by_server(sock, timeout):
    """Whether the server closes `sock` within `timeout` seconds (reading whatever it sent first)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if sock.recv(65536) == b"":
                return True
    except (socket.timeout, ConnectionResetError):
        return False
    return False


def log_lines(service):
    """The JSON lines the service logged."""
    lines = []
    for raw in service.output().splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    return lines


def no_traceback_in(service):
    """The service logged no traceback and no 500."""
    output = service.output()
    return "Traceback" not in output and '"status": 500' not in output


# 1. A client that stops reading

def test_a_stalled_reader_keeps_the_lease_short_and_renewed_then_is_treated_as_gone(
        start_service, llm, redis_client):
    """While a client reads nothing, the turn's lease never has more than LEASE_SECONDS left, is renewed
    past its expiry (no second turn runs), and after SSE_WRITE_TIMEOUT_SECONDS the turn is saved
    interrupted and the model request closed; the next turn is saved after it."""
    service = start_service(LEASE_SECONDS=1, SSE_WRITE_TIMEOUT_SECONDS=3)
    llm.script(Script(chunks=BIG_CHUNKS, chunk_delay=0.05))
    body = json.dumps({"message": "tell me everything", "conversation_id": "c1"}).encode()
    stalled = raw_request(service, "POST", "/chat/stream", body, receive_buffer=4096,
                          headers={"Content-Type": "application/json",
                                   "Authorization": f"Bearer {token('alice')}"})
    lease_key = "chat:turn-lock:alice:c1"
    assert wait_until(lambda: redis_client.exists(lease_key), timeout=10)
    started = time.monotonic()
    while time.monotonic() - started < 2.0:  # twice the lease's expiry
        assert 0 < redis_client.pttl(lease_key) <= 1000
        assert_error(service.post("/chat/run", {"message": "me too", "conversation_id": "c1"}),
                              409, "conversation_busy")
        time.sleep(0.2)
    assert llm.wait_for_disconnects(1, timeout=20)
    assert wait_until(lambda: [m[2] for m in stored_messages("c1", "alice")] == ["complete", "interrupted"],
                      timeout=10)
    stalled.close()
    llm.script(Script(reply="second"))
    assert service.post("/chat/run", {"message": "next", "conversation_id": "c1"}).status_code == 200
    assert [m[1] for m in stored_messages("c1", "alice")][2:] == ["next", "second"]
    assert no_traceback_in(service)


# 2. The model's error text never reaches the caller

UPSTREAM_SECRETS = [
    (401, "Incorrect API key provided: Bearer sk-live-0123456789abcdef. You can find your key at ..."),
    (500, "could not connect to postgres://admin:hunter2-secret@db.internal:5432/llm"),
]


@pytest.mark.parametrize("status,upstream_text", UPSTREAM_SECRETS)
def test_an_upstream_error_gives_our_message_and_logs_its_text_masked(start_service, llm, status, upstream_text):
    """The caller gets our message with the upstream status only; the log has the body with secrets masked."""
    service = start_service(LLM_API_KEY="sk-live-0123456789abcdef")
    llm.script(Script(status=status, error_message=upstream_text))
    response = service.post("/chat/run", {"message": "hi", "conversation_id": "c1"})
    assert_error(response, 502, "llm_error")
    assert response.json()["error"]["message"].startswith(f"the model answered HTTP {status}")
    for leaked in ("sk-live", "hunter2", "Incorrect API key", "postgres://"):
        assert leaked not in response.text
    assert wait_until(lambda: f"the model answered HTTP {status}: " in service.output(), timeout=5)
    assert "sk-live-0123456789abcdef" not in service.output() and "hunter2-secret" not in service.output()
    assert "[masked]" in service.output()


@pytest.mark.parametrize("given,passed", [("30", "30"), ("Wed, 21 Oct 2026 07:28:00 GMT", "Wed, 21 Oct 2026 07:28:00 GMT"),
                                          ("sk-secret-value", None), ("99999999999", None)])
def test_retry_after_is_passed_on_only_as_seconds_or_a_date(pg_client, llm, given, passed):
    """An upstream 429's Retry-After reaches the caller only if it is a small integer or an HTTP date."""
    llm.script(Script(status=429, retry_after=given))
    response = pg_client.post("/chat/run", json={"message": "hi", "conversation_id": "c1"}, headers=bearer())
    assert_error(response, 503, "llm_rate_limited")
    assert response.headers.get("Retry-After") == passed


# 3. Conversation ids are per user

def probe_all(service, user, conversation_id):
    """What every endpoint answers `user` about a conversation id: (status, body) each, request ids aside."""
    calls = [("GET", f"/conversations/{conversation_id}", None),
             ("PATCH", f"/conversations/{conversation_id}", {"title": "mine now"}),
             ("POST", "/chat/stop", {"conversation_id": conversation_id}),
             ("DELETE", f"/conversations/{conversation_id}", None)]
    answers = []
    for method, path, body in calls:
        response = requests.request(method, service.url + path, json=body, timeout=10,
                                    headers={**bearer(user), "Connection": "close"})
        answers.append((method, path.replace(conversation_id, "ID"), response.status_code, response.text))
    return answers


def test_no_answer_to_bob_depends_on_whether_alice_has_a_conversation_of_that_name(service, llm):
    """Bob's answers about "demo-1", which alice has, are exactly his answers about a name nobody has."""
    assert service.post("/chat/run", {"message": "alice's", "conversation_id": "demo-1"}).status_code == 200
    assert probe_all(service, "bob", "demo-1") == probe_all(service, "bob", "nobody-has-this")
    assert [m[1] for m in stored_messages("demo-1", "alice")] == ["alice's", "echo: alice's"]


def test_the_same_id_for_two_users_is_two_conversations(service, llm):
    """alice's demo-1 and bob's demo-1 keep their own messages and titles, and bob's delete leaves alice's."""
    service.post("/chat/run", {"message": "from alice", "conversation_id": "demo-1"}, user="alice")
    service.post("/chat/run", {"message": "from bob", "conversation_id": "demo-1"}, user="bob")
    assert [m[1] for m in stored_messages("demo-1", "alice")] == ["from alice", "echo: from alice"]
    assert [m[1] for m in stored_messages("demo-1", "bob")] == ["from bob", "echo: from bob"]
    bobs = requests.delete(service.url + "/conversations/demo-1", headers=bearer("bob"), timeout=10)
    assert bobs.status_code == 204
    assert stored_messages("demo-1", "bob") == [] and len(stored_messages("demo-1", "alice")) == 2
    service.post("/chat/run", {"message": "again", "conversation_id": "demo-1"}, user="alice")
    assert llm.requests[-1]["json"]["messages"][-3:] == [
        {"role": "user", "content": "from alice"}, {"role": "assistant", "content": "echo: from alice"},
        {"role": "user", "content": "again"}]


def test_bob_probing_alices_id_never_makes_her_turn_busy(service, llm):
    """Bob holding a stream on "demo-1" does not hold alice's "demo-1"."""
    llm.script(Script(chunks=["slow ", "reply"], chunk_delay=30))
    with service.stream("bob's long one", "demo-1", user="bob") as bobs:
        assert bobs.status_code == 200
        assert llm.wait_for_requests(1)
        llm.script(Script(reply="alice gets through"))
        answer = service.post("/chat/run", {"message": "mine", "conversation_id": "demo-1"}, user="alice")
        assert answer.status_code == 200 and answer.json()["response"] == "alice gets through"
        llm.release()


# 4. No 500 for odd input

NESTED = b"[" * 100000


@pytest.mark.parametrize("method,path", [("POST", "/chat/run"), ("POST", "/chat/stream"), ("POST", "/chat/stop"),
                                         ("PATCH", "/conversations/c1")])
def test_deeply_nested_json_is_a_400(service, method, path):
    """JSON nested past Python's recursion limit is a bad body, not a crash."""
    response = requests.request(method, service.url + path, data=NESTED, timeout=10,
                                headers={**bearer(), "Content-Type": "application/json", "Connection": "close"})
    assert_error(response, 400, "invalid_request")
    assert no_traceback_in(service)


CHUNKED = {"Content-Length": None, "Transfer-Encoding": "chunked", "Content-Type": "application/json"}
BAD_CHUNKS = {"bad-chunk-size": b"zz\r\n{}\r\n0\r\n\r\n",
              "missing-chunk-terminator": b"2\r\n{}XX0\r\n\r\n",
              "cut-before-the-last-chunk": b"2\r\n{}\r\n0\r\n"}


@pytest.mark.parametrize("method,path", [("POST", "/chat/run"), ("PATCH", "/conversations/c1")])
@pytest.mark.parametrize("body", BAD_CHUNKS.values(), ids=BAD_CHUNKS.keys())
def test_a_malformed_chunked_body_is_a_400(service, method, path, body):
    """A chunked body whose framing is broken is a bad request in the one error shape, not a 500."""
    sock = raw_request(service, method, path, body, headers={**CHUNKED, "Authorization": f"Bearer {token()}"})
    sock.shutdown(socket.SHUT_WR)  # nothing more comes: a body cut short ends here
    status, answer = raw_answer(sock)
    sock.close()
    assert (status, answer) == (400, {"error": {"code": "invalid_request",
                                                "message": "the request body's chunked encoding is malformed"}})
    assert no_traceback_in(service)


@pytest.mark.parametrize("path,position", [
    ("/conversations", ["2026-01-01T00:00:00", "a\u0000b"]),
    ("/conversations", ["2026-01-01T00:00:00", "\ud800"]),
    ("/conversations/c1", 10**30),
    ("/conversations/c1", -1),
])
def test_a_cursor_holding_odd_values_is_a_400(service, llm, path, position):
    """A cursor holding a NUL, a lone surrogate or an impossible message id is refused, not a crash."""
    service.post("/chat/run", {"message": "hi", "conversation_id": "c1"})
    response = requests.get(service.url + path, params={"cursor": cursor_of(position)},
                            headers={**bearer(), "Connection": "close"}, timeout=10)
    assert_error(response, 400, "invalid_request")
    assert no_traceback_in(service)


@pytest.mark.parametrize("subject", ["a\u0000b", "\ud800", "x" * 256, ""])
def test_a_signed_token_with_an_unusable_subject_is_a_401_before_the_model(service, llm, subject):
    """A subject with a NUL, a lone surrogate, over 255 characters or empty is refused up front."""
    headers = {"Authorization": f"Bearer {token(subject)}", "Connection": "close"}
    response = requests.post(service.url + "/chat/run", json={"message": "hi", "conversation_id": "c1"},
                             headers=headers, timeout=10)
    assert_error(response, 401, "unauthorized")
    assert llm.requests == []
    assert no_traceback_in(service)


def test_a_token_whose_exp_is_a_string_of_digits_keeps_working(service, llm):
    """An issuer that writes `exp` as a string: accepted as PyJWT reads it, and no 500 when kept."""
    headers = {"Authorization": f"Bearer {token(exp=str(int(time.time()) + 3600))}", "Connection": "close"}
    statuses = [requests.get(service.url + "/conversations", headers=headers, timeout=10).status_code
                for _ in range(4)]
    assert statuses == [200] * 4
    assert no_traceback_in(service)


@pytest.mark.parametrize("exp", [10**309, 10**400, "1" + "0" * 400], ids=["10^309", "10^400", "digits-10^400"])
def test_a_token_whose_exp_is_past_any_time_is_a_401_and_status_stays_public(pg_client, exp):
    """An `exp` too large for a float is refused as the token's own fault (twice: nothing bad was kept),
    and /status with it answers as without a token."""
    headers = {"Authorization": f"Bearer {token(exp=exp)}"}
    for _ in range(2):
        assert_error(pg_client.get("/conversations", headers=headers), 401, "unauthorized", mentions="exp")
        public = pg_client.get("/status", headers=headers)
        assert public.status_code == 200 and set(public.get_json()) == {"status", "database", "cache"}


@pytest.mark.parametrize("path", ["/chat/run", "/chat/stream"])
def test_a_reply_holding_nul_or_a_lone_surrogate_is_cleaned_saved_and_finished(service, llm, path):
    """What the database cannot keep is replaced by U+FFFD; the turn ends normally and is saved."""
    raw = (b'data: {"choices": [{"index": 0, "delta": {"content": "a\\u0000b"}}]}\n\n'
           b'data: {"choices": [{"index": 0, "delta": {"content": "c\\ud800d"}, "finish_reason": "stop"}]}\n\n'
           b'data: [DONE]\n\n')
    complete = b'{"choices": [{"index": 0, "message": {"content": "a\\u0000bc\\ud800d"}, "finish_reason": "stop"}]}'
    llm.script(Script(raw=[raw] if path.endswith("stream") else [complete]))
    with service.post(path, {"message": "hi", "conversation_id": "c1"}, stream=True) as response:
        assert response.status_code == 200
        if path.endswith("stream"):
            final = data_events(response)[-1]
            assert final["is_final"] is True and "error" not in final
    assert stored_messages("c1", "alice")[1] == ("assistant", "a\ufffdbc\ufffdd", "complete")
    assert no_traceback_in(service)


@pytest.mark.parametrize("usage", [{"prompt_tokens": "NaN", "completion_tokens": "NaN"},
                                   {"prompt_tokens": 10**30, "completion_tokens": -5}])
def test_a_nonsense_usage_from_the_model_is_estimated_instead(service, llm, usage):
    """Usage figures that are not plausible whole numbers are replaced by estimates, not a 503."""
    llm.script(Script(reply="four words of reply", usage_value=usage))
    response = service.post("/chat/run", {"message": "hi", "conversation_id": "c1"})
    assert response.status_code == 200
    assert stored_messages("c1", "alice")[1] == ("assistant", "four words of reply", "complete")
    assert no_traceback_in(service)


# 5. Limits per user and per connection

def test_streams_per_user_are_capped_across_instances(start_service, llm):
    """Past MAX_STREAMS_PER_USER open streams, on any instance, another is 429 too_many_streams."""
    first, second = start_service(MAX_STREAMS_PER_USER=2), start_service(MAX_STREAMS_PER_USER=2)
    llm.script(*[Script(chunks=["slow ", "reply"], chunk_delay=30)] * 3)
    with first.stream("one", "c1") as one, second.stream("two", "c2") as two:
        assert (one.status_code, two.status_code) == (200, 200)
        third = first.post("/chat/stream", {"message": "three", "conversation_id": "c3"})
        assert_error(third, 429, "too_many_streams")
        other_user = second.stream("bob's", "c4", user="bob")
        assert other_user.status_code == 200
        other_user.close()
        llm.release()

    def opens():
        """Whether a new stream is let in now (the closed ones gave their slots back)."""
        llm.script(Script(reply="room again"))
        with first.stream("four", "c5") as four:
            return four.status_code == 200 and data_events(four)[-1]["is_final"]

    assert wait_until(opens, timeout=15, interval=0.5)


def test_the_rate_limit_slides_across_the_minute_boundary(make_app, postgres_url, redis_client):
    """A user who spent the limit in the last minute is not given a fresh one when the clock minute turns."""
    app = make_app(DATABASE_URL=postgres_url, REDIS_URL=REDIS_URL, RATE_LIMIT_PER_MINUTE=60)
    assert wait_until(lambda: time.time() % 60 < 45, timeout=20)  # well inside a minute, so the test is exact
    window = int(time.time() // 60)
    redis_client.set(f"chat:rate:alice:{window - 1}", 60)  # the whole limit, spent in the previous minute
    client = app.test_client()
    statuses = [client.get("/conversations", headers=bearer("alice")).status_code for _ in range(60)]
    elapsed = time.time() % 60
    # Of the previous minute's 60, the share still inside the last 60 s counts: room for about `elapsed`.
    assert statuses.count(200) <= int(elapsed) + 1
    assert statuses.count(429) >= 60 - int(elapsed) - 1
    limited = client.get("/conversations", headers=bearer("alice"))
    assert 1 <= int(limited.headers["Retry-After"]) <= 120


def test_a_header_that_is_not_exactly_bearer_token_is_refused(service, llm):
    """Padding variants of one valid token are refused, so none of them is kept."""
    good = token()
    for variant in [f"Basic {'A' * 1000}, Bearer {good}", f"bearer {good}",
                    f"Bearer  {good}", f"Bearer {good}, Basic x"]:
        response = requests.get(service.url + "/conversations", headers={"Authorization": variant,
                                                                          "Connection": "close"}, timeout=10)
        assert_error(response, 401, "unauthorized")
    ok = requests.get(service.url + "/conversations", headers={"Authorization": f"Bearer {good}",
                                                              "Connection": "close"}, timeout=10)
    assert ok.status_code == 200


def test_verified_tokens_are_bounded_in_what_they_hold():
    """The kept tokens never hold more than their character budget, dropping the oldest."""
    kept = auth.VerifiedTokens(size=1000, chars=10000)
    for n in range(100):
        kept.remember(f"token-{n:03d}-" + "x" * 990, {}, {"sub": "alice"})
    assert kept._held <= 10000
    assert kept.claims_of("token-099-" + "x" * 990) is not None
    assert kept.claims_of("token-000-" + "x" * 990) is None


def test_a_request_whose_headers_never_finish_is_dropped(start_service):
    """Headers that trickle in are cut off CLIENT_READ_TIMEOUT_SECONDS after their first byte."""
    service = start_service(CLIENT_READ_TIMEOUT_SECONDS=1)
    slow = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(5)]
    for sock in slow:
        sock.sendall(b"GET /status HTTP/1.1\r\nHost: test\r\n")  # and never the blank line
    assert all(closed_by_server(sock, timeout=10) for sock in slow)
    assert requests.get(service.url + "/status", timeout=5).status_code == 200


def test_a_body_that_never_finishes_gets_408(start_service):
    """A body that stops short of its Content-Length is answered 408 once the deadline passes."""
    service = start_service(CLIENT_READ_TIMEOUT_SECONDS=1)
    sock = socket.create_connection(("127.0.0.1", service.port))
    sock.sendall(b"POST /chat/run HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + token().encode() + b"\r\nContent-Length: 100\r\n\r\n{\"mess")
    sock.settimeout(10)
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408")
    assert closed_by_server(sock, timeout=10)
    assert no_traceback_in(service)


def test_a_connection_that_never_sends_a_byte_is_dropped(start_service):
    """The first request's first byte is due within CLIENT_READ_TIMEOUT_SECONDS of the connection, not within
    keep-alive's 75 s."""
    service = start_service(CLIENT_READ_TIMEOUT_SECONDS=1)
    silent = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(5)]
    assert all(closed_by_server(sock, timeout=10) for sock in silent)
    assert requests.get(service.url + "/status", timeout=5).status_code == 200


def kept_alive_answer(sock):
    """The status of the answer the server sent on a kept-alive `sock`, read to the end of its Content-Length."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split(b" ", 2)[1])


def test_a_kept_alive_connection_may_wait_longer_than_the_read_deadline_between_requests(start_service):
    """After a first request, the wait for the next one on the connection is bounded by keep-alive, not by
    CLIENT_READ_TIMEOUT_SECONDS."""
    service = start_service(CLIENT_READ_TIMEOUT_SECONDS=0.5)
    sock = raw_request(service, "GET", "/status")
    sock.settimeout(10)
    assert kept_alive_answer(sock) == 200
    assert not closed_by_server(sock, timeout=2)  # four read deadlines of idling between two requests
    sock.sendall(b"GET /status HTTP/1.1\r\nHost: test\r\n\r\n")
    sock.settimeout(10)
    assert kept_alive_answer(sock) == 200
    sock.close()


def read_until(sock, marker, pause=0.0, size=65536):
    """Read what the server sends on `sock`, `size` bytes at most a read and `pause` seconds between reads, until
    `marker` came; whether it did (else the server closed the connection first)."""
    received = bytearray()
    sock.settimeout(30)
    while marker not in received[-(len(marker) + size):]:
        chunk = sock.recv(size)
        if not chunk:
            return False
        received += chunk
        time.sleep(pause)  # a slow reader: the pace is what is under test
    return True


def test_a_slow_reader_that_keeps_reading_a_large_replay_is_not_dropped(start_service, llm):
    """SSE_WRITE_TIMEOUT_SECONDS bounds each wait with no progress, not a whole write: a resumed stream whose
    replay is one 12 MB write, read 64 KB every 20 ms (seconds in all, no pause near the deadline), arrives whole."""
    service = start_service(SSE_WRITE_TIMEOUT_SECONDS=1.5, LLM_TIMEOUT_SECONDS=60, STREAM_RESUME_GRACE_SECONDS=20)
    llm.script(Script(chunks=BIG_CHUNKS, silence_after=len(BIG_CHUNKS)))  # then waits for llm.release()
    last = f" {len(BIG_CHUNKS) - 1}\"".encode()
    auth = {"Authorization": f"Bearer {token('alice')}"}
    body = json.dumps({"message": "tell me everything", "conversation_id": "c1"}).encode()
    first = raw_request(service, "POST", "/chat/stream", body, headers={**auth, "Content-Type": "application/json"})
    assert read_until(first, last)  # the whole reply is in the turn's feed
    replay = raw_request(service, "GET", "/chat/stream/c1", headers=auth, receive_buffer=65536)
    assert read_until(replay, last, pause=0.02)
    llm.release()
    first.close()
    replay.close()
    assert no_traceback_in(service)


# 6. Headers and the open status page

def test_authenticated_answers_are_not_stored_or_sniffed_and_name_no_server(service, llm):
    """Cache-Control: no-store and nosniff on answers for a user; no Server header naming gunicorn."""
    answers = [service.post("/chat/run", {"message": "hi", "conversation_id": "c1"}),
               requests.get(service.url + "/conversations", headers=bearer(), timeout=10),
               requests.get(service.url + "/conversations", timeout=10)]
    for response in answers:
        assert "no-store" in response.headers["Cache-Control"]
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert "gunicorn" not in response.headers.get("Server", "").lower()
    with service.stream("hi", "c2") as stream:
        assert stream.headers["Cache-Control"] == "no-cache, no-store"


def test_status_without_a_token_says_only_what_is_up(service, llm):
    """No upstream URL, no version, no timings without a token; all of them with one."""
    public = requests.get(service.url + "/status", timeout=10).json()
    assert public == {"status": "ok", "database": {"state": "ok"}, "cache": {"state": "ok"}}
    detailed = requests.get(service.url + "/status", headers=bearer(), timeout=10).json()
    assert detailed["model"]["base_url"] == llm.url
    assert "round_trip_ms" in detailed["database"] and "version" in detailed


def test_a_flood_of_status_checks_the_parts_once_a_second(service):
    """Two hundred /status requests in a row share their checks: the same round-trip times come back."""
    started = time.monotonic()
    reports = [requests.get(service.url + "/status", headers=bearer(), timeout=10).json()
               for _ in range(200)]
    elapsed = time.monotonic() - started
    distinct = {(r["database"]["round_trip_ms"], r["cache"]["round_trip_ms"]) for r in reports}
    assert len(distinct) <= elapsed + 2
