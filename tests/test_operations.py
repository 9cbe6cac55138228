"""Running the service: the request log, LOG_LEVEL, /status, the rate limit and the prune command."""

import datetime
import re
import time

import pytest

import models
from config import VERSION
from tests.fake_llm import Script
from tests.helpers import (
    SECRET,
    lines_for,
    request_lines,
    assert_error,
    bearer,
    cache_key,
    listening_for_stops,
    message_counts,
    run,
    slow_stream,
    token,
    wait_until,
)
from tests.sse_client import data_events, rest_of



# The request log

def logged(service, request_id):
    """The one request-log line of `request_id`, once it is written (then no other may follow)."""
    assert wait_until(lambda: lines_for(service, request_id), timeout=10), service.output()[-3000:]
    marker = f"marker-{request_id}"
    with call(service, "GET", "/status", marker):
        pass
    assert wait_until(lambda: lines_for(service, marker), timeout=10)
    found = lines_for(service, request_id)
    assert len(found) == 1, found
    return found[0]


def with_id(request_id):
    """Headers carrying `request_id` as X-Request-Id (none if it is None)."""
    return {} if request_id is None else {"X-Request-Id": request_id}


def call(service, method, path, request_id=None, **kwargs):
    """A request to the service (as Service.request makes it), with X-Request-Id if given."""
    return service.request(method, path, headers=with_id(request_id), **kwargs)


def stream_turn(service, request_id, conversation_id="c1", message="hello"):
    """Run a streamed turn to its end; its data events."""
    with service.stream(message, conversation_id, headers=with_id(request_id)) as response:
        return data_events(response)


def test_a_run_turn_logs_one_line_with_its_fields(service, llm):
    """A /chat/run is one line: request fields, user, conversation, model, tokens and outcome."""
    llm.script(Script(reply="three word reply", model="served-model"))
    with call(service, "POST", "/chat/run", "run-1", body={"message": "hi", "conversation_id": "c1"}):
        pass
    line = logged(service, "run-1")
    assert {key: line[key] for key in ("level", "method", "path", "status", "user", "conversation_id",
                                       "model", "prompt_tokens", "completion_tokens", "outcome")} == {
        "level": "info", "method": "POST", "path": "/chat/run", "status": 200, "user": "alice",
        "conversation_id": "c1", "model": "served-model", "prompt_tokens": 1,
        "completion_tokens": 3, "outcome": "complete"}
    assert isinstance(line["duration_ms"], (int, float)) and line["duration_ms"] >= 0
    assert "time_to_first_token" not in line


def test_a_streamed_turn_logs_its_time_to_first_token(service, llm):
    """A /chat/stream line also has the time to the first token, within the request's duration."""
    llm.script(Script(chunks=["a", "b"]))
    stream_turn(service, "stream-1")
    line = logged(service, "stream-1")
    assert (line["path"], line["status"], line["outcome"]) == ("/chat/stream", 200, "complete")
    assert (line["user"], line["conversation_id"], line["model"]) == ("alice", "c1", "fake-model")
    assert line["completion_tokens"] == 2 and line["prompt_tokens"] == 1
    assert 0 <= line["time_to_first_token"] * 1000 <= line["duration_ms"]


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/status", None), ("GET", "/conversations", None), ("POST", "/chat/run", {"message": ""}),
    ("POST", "/chat/run", {"message": "hi", "conversation_id": "c1"}),
], ids=["status", "list", "bad-request", "turn"])
def test_every_request_writes_exactly_one_line(service, llm, method, path, body):
    """Whatever the request and its outcome, it is logged once, with its method, path and status."""
    with call(service, method, path, "one-line", body=body) as response:
        status = response.status_code
    line = logged(service, "one-line")
    assert (line["method"], line["path"], line["status"]) == (method, path, status)


def test_a_refused_token_is_logged_without_a_user(service, llm):
    """A 401 is logged with its status and no user."""
    with call(service, "GET", "/conversations", "no-user", user=None) as response:
        assert response.status_code == 401
    line = logged(service, "no-user")
    assert line["status"] == 401 and "user" not in line


@pytest.fixture
def turn_in_c1(service, llm):
    """The service, with conversation c1 of alice's holding one turn."""
    with call(service, "POST", "/chat/run", body={"message": "hi", "conversation_id": "c1"}) as response:
        assert response.status_code == 200
    return service


CONVERSATION_REQUESTS = {
    "run": ("POST", "/chat/run", {"message": "again", "conversation_id": "c1"}),
    "stop": ("POST", "/chat/stop", {"conversation_id": "c1"}),
    "read": ("GET", "/conversations/c1", None),
    "rename": ("PATCH", "/conversations/c1", {"title": "renamed"}),
    "delete": ("DELETE", "/conversations/c1", None),
}


@pytest.mark.parametrize("method, path, body", CONVERSATION_REQUESTS.values(), ids=CONVERSATION_REQUESTS.keys())
def test_requests_about_a_conversation_log_its_id(turn_in_c1, method, path, body):
    """Every authenticated request that names a conversation logs its id and the user."""
    with call(turn_in_c1, method, path, "about-c1", body=body):
        pass
    line = logged(turn_in_c1, "about-c1")
    assert (line["user"], line["conversation_id"]) == ("alice", "c1")


def test_a_stream_cut_by_the_model_logs_outcome_error(service, llm):
    """A stream the model breaks off is logged as an error, with the error's code."""
    llm.script(Script(chunks=["a", "b", "c"], break_after=1))
    final = stream_turn(service, "broken")[-1]
    assert final["error"]["code"] == "llm_unavailable"
    line = logged(service, "broken")
    assert (line["outcome"], line["error"]) == ("error", "llm_unavailable")


@pytest.mark.parametrize("path", ["/chat/run", "/chat/stream"])
def test_a_turn_the_model_refuses_logs_outcome_error(service, llm, path):
    """A turn that fails at the model before any reply is still logged as a turn with outcome error."""
    llm.script(Script(status=500))
    with call(service, "POST", path, "refused", body={"message": "hi", "conversation_id": "c1"}) as response:
        assert response.status_code == 502
    line = logged(service, "refused")
    assert line["status"] == 502
    assert line.get("outcome") == "error", line


def test_a_stream_the_client_left_logs_outcome_interrupted(start_service, llm):
    """A client hanging up mid-stream is logged as interrupted, once the service notices."""
    service = start_service(SSE_HEARTBEAT_SECONDS=0.2)
    with slow_stream(service, llm, "c1", "hi", headers=with_id("left")):
        pass  # hang up after the first chunk
    line = logged(service, "left")
    assert line["outcome"] == "interrupted" and line["completion_tokens"] == 2


def test_a_stopped_stream_logs_outcome_stopped(service, llm, redis_client):
    """A stream ended by POST /chat/stop is logged as stopped."""
    with service.run("hi", "c1") as response:
        assert response.status_code == 200
    with slow_stream(service, llm, "c1", "go", headers=with_id("stopped")) as stream:
        assert wait_until(lambda: listening_for_stops(redis_client))
        with call(service, "POST", "/chat/stop", body={"conversation_id": "c1"}) as stopping:
            assert stopping.status_code == 202
        assert rest_of(stream)[-1]["finish_reason"] == "stopped"
    assert logged(service, "stopped")["outcome"] == "stopped"


def test_the_stream_line_is_written_after_the_final_event(service, llm):
    """While a stream is open its line is not written; it is once the stream has ended."""
    with slow_stream(service, llm, "c1", "hi", headers=with_id("late-line")) as stream:
        assert lines_for(service, "late-line") == []
        llm.release()
        assert rest_of(stream)[-1]["is_final"] is True
    line = logged(service, "late-line")
    assert line["outcome"] == "complete" and line["completion_tokens"] == 2


def test_a_given_request_id_is_echoed_and_logged(service, llm):
    """X-Request-Id from the client comes back in the response and is the logged id."""
    with call(service, "GET", "/conversations", "client-id-42.a:b_c") as response:
        assert response.headers["X-Request-Id"] == "client-id-42.a:b_c"
    assert logged(service, "client-id-42.a:b_c")["path"] == "/conversations"


@pytest.mark.parametrize("given", [None, "has space", "x" * 129, "ünïcode"], ids=["none", "space", "long", "unicode"])
def test_without_a_usable_request_id_one_is_generated(service, llm, given):
    """With no (or an unusable) X-Request-Id, the service makes one, returns it and logs it."""
    sent = None if given is None else given.encode().decode("latin-1")
    with call(service, "GET", "/conversations", sent) as response:
        request_id = response.headers["X-Request-Id"]
    assert re.fullmatch(r"[A-Za-z0-9._:-]{8,128}", request_id) and request_id != given
    assert logged(service, request_id)["path"] == "/conversations"


def test_generated_request_ids_differ(service, llm):
    """Two requests without an id get different ids."""
    ids = set()
    for _ in range(2):
        with call(service, "GET", "/status", user=None) as response:
            ids.add(response.headers["X-Request-Id"])
    assert len(ids) == 2


MESSAGE_TEXT = "zebra-quartz-message-7781"
REPLY_TEXT = "orchid-violet-reply-5523"
API_KEY = "sk-api-key-never-logged-9431"
BAD_TOKEN = "not.a-token-but-never-logged-2210"


def test_no_text_token_or_secret_ever_reaches_the_output(start_service, llm):
    """Messages, replies, bearer tokens, the API key and the JWT secret appear nowhere in the logs."""
    service = start_service(LLM_API_KEY=API_KEY)
    alice_token = token("alice")
    as_alice = {"Authorization": f"Bearer {alice_token}"}
    llm.script(Script(reply=REPLY_TEXT), Script(chunks=[REPLY_TEXT[:8], REPLY_TEXT[8:]]),
               Script(chunks=[REPLY_TEXT, "more"], break_after=1), Script(status=500))
    for path in ("/chat/run", "/chat/stream", "/chat/stream", "/chat/run"):
        with service.post(path, {"message": MESSAGE_TEXT, "conversation_id": "c1"}, user=None,
                          headers=as_alice) as response:
            response.content  # noqa: B018 - read the whole stream
    with service.post("/chat/run", {"message": MESSAGE_TEXT}, user=None,
                      headers={"Authorization": f"Bearer {BAD_TOKEN}"}) as response:
        assert response.status_code == 401
    with service.request("GET", "/conversations/c1", user=None, headers=as_alice) as response:
        assert REPLY_TEXT in response.text
    assert llm.requests[0]["headers"]["authorization"] == f"Bearer {API_KEY}"
    service.stop()
    output = service.output()
    assert len(request_lines(service)) >= 7
    for secret in (MESSAGE_TEXT, REPLY_TEXT, REPLY_TEXT[:8], REPLY_TEXT[8:], alice_token, BAD_TOKEN,
                   API_KEY, SECRET):
        assert secret not in output


@pytest.mark.parametrize("level, logs_requests", [("info", True), ("warning", False)])
def test_log_level_decides_whether_requests_are_logged(start_service, llm, level, logs_requests):
    """LOG_LEVEL=info writes the request lines; LOG_LEVEL=warning leaves them out."""
    service = start_service(LOG_LEVEL=level)
    with call(service, "POST", "/chat/run", "level", body={"message": "hi"}) as response:
        assert response.status_code == 200
    service.stop()
    assert bool(lines_for(service, "level")) is logs_requests
    assert bool(request_lines(service)) is logs_requests


# GET /status

def test_status_with_a_token_reports_version_round_trips_and_model(service, llm):
    """/status with a valid token reports the version, each store's state and round trip, and the model."""
    with call(service, "GET", "/status", user="alice") as response:
        assert response.status_code == 200
        body = response.json()
    assert (body["status"], body["version"]) == ("ok", VERSION)
    for part, backend in (("database", "postgresql"), ("cache", "redis")):
        assert (body[part]["state"], body[part]["backend"]) == ("ok", backend)
        assert isinstance(body[part]["round_trip_ms"], (int, float)) and 0 <= body[part]["round_trip_ms"] < 5000
    assert body["model"] == {"backend": "openai-compatible", "model": "fake-model", "base_url": llm.url}


def test_status_reports_an_unreachable_cache_as_degraded(make_pg_app):
    """A cache that cannot be reached is 'unavailable', without a round trip, and the service 'degraded'."""
    app = make_pg_app(REDIS_URL="redis://127.0.0.1:1/0")
    body = app.test_client().get("/status", headers=bearer()).get_json()
    assert body["status"] == "degraded"
    assert body["cache"] == {"state": "unavailable", "backend": "redis", "turn_leases": "per_process",
                             "reason": "connection refused: nothing listens at the host and port of REDIS_URL"}
    assert body["database"]["state"] == "ok"


# The rate limit

@pytest.fixture
def early_in_the_minute():
    """Wait until the clock is early enough in its minute for a test's requests to share it."""
    assert wait_until(lambda: time.time() % 60 < 55, timeout=10)


@pytest.fixture
def limited_client(make_pg_app, early_in_the_minute):
    """A test client of an app allowing 3 requests a minute per user."""
    return make_pg_app(RATE_LIMIT_PER_MINUTE=3).test_client()


def test_the_fourth_request_in_a_minute_is_429_with_retry_after(limited_client):
    """Over RATE_LIMIT_PER_MINUTE the user gets 429 rate_limited and when to retry."""
    for _ in range(3):
        assert limited_client.get("/conversations", headers=bearer()).status_code == 200
    response = limited_client.get("/conversations", headers=bearer())
    assert_error(response, 429, "rate_limited")
    # Four in this minute: the window has room again once enough of them slid out, 30 s into the next.
    retry_after = int(response.headers["Retry-After"])
    assert 30 <= retry_after <= 90
    assert abs(retry_after - (90 - time.time() % 60)) <= 2


def test_a_rate_limited_turn_never_reaches_the_model(limited_client, llm):
    """The turn refused with 429 is not sent to the model nor stored."""
    for n in range(3):
        limited_client.post("/chat/run", json={"message": f"m{n}", "conversation_id": "c1"}, headers=bearer())
    response = limited_client.post("/chat/run", json={"message": "m3", "conversation_id": "c1"}, headers=bearer())
    assert_error(response, 429, "rate_limited")
    assert len(llm.requests) == 3
    with models.db.connection_context():
        assert models.Message.select().count() == 6


def test_the_rate_limit_is_per_user(limited_client):
    """Alice using up her requests leaves bob's untouched."""
    for _ in range(4):
        limited_client.get("/conversations", headers=bearer("alice"))
    assert limited_client.get("/conversations", headers=bearer("alice")).status_code == 429
    assert limited_client.get("/conversations", headers=bearer("bob")).status_code == 200


def test_the_rate_limit_is_shared_by_services_on_one_redis(start_service, early_in_the_minute):
    """Two requests on service A and two on service B: the fourth is over the limit of 3."""
    service_a, service_b = start_service(RATE_LIMIT_PER_MINUTE=3), start_service(RATE_LIMIT_PER_MINUTE=3)
    statuses = []
    for service in (service_a, service_a, service_b, service_b):
        with call(service, "GET", "/conversations") as response:
            statuses.append(response.status_code)
    assert statuses == [200, 200, 200, 429]


def test_there_is_no_rate_limit_by_default(pg_client):
    """Without RATE_LIMIT_PER_MINUTE, many requests in a row are all answered."""
    assert {pg_client.get("/conversations", headers=bearer()).status_code for _ in range(40)} == {200}


# flask prune

def make_turn(app, conversation_id, age=None):
    """A turn in `conversation_id`, then its activity moved `age` into the past."""
    run(app.test_client(), "hi", conversation_id)
    if age is not None:
        with models.db.connection_context():
            (models.Conversation.update(updated_at=models.utcnow() - age)
             .where(models.Conversation.id == conversation_id).execute())


def prune(app, *args, answer=None):
    """Run `flask prune ARGS` (answering its question with `answer`, or --yes); the click result."""
    if answer is None:
        args = (*args, "--yes")
    return app.test_cli_runner().invoke(args=["prune", *args], input=answer)


def test_prune_deletes_old_conversations_and_keeps_recent_ones(pg_app):
    """Conversations idle longer than --older-than days go with their messages; the rest stay."""
    days = datetime.timedelta(days=1)
    make_turn(pg_app, "old-1", 40 * days)
    make_turn(pg_app, "old-2", 31 * days)
    make_turn(pg_app, "recent", 29 * days)
    make_turn(pg_app, "fresh")
    result = prune(pg_app, "--older-than", "30")
    assert result.exit_code == 0, result.output
    assert re.search(r"\bdeleted 2\b", result.output)
    assert message_counts() == {"recent": 2, "fresh": 2}


def test_prune_drops_the_cached_copies_of_what_it_deletes(pg_app, redis_client):
    """The Redis copy of a pruned conversation goes too; a kept one's stays."""
    make_turn(pg_app, "old", datetime.timedelta(days=40))
    make_turn(pg_app, "fresh")
    prune(pg_app, "--older-than", "30")
    assert not redis_client.exists(cache_key("old"))
    assert redis_client.exists(cache_key("fresh"))


def test_prune_with_nothing_old_deletes_nothing(pg_app):
    """With only recent conversations prune reports 0 and keeps them."""
    make_turn(pg_app, "fresh")
    result = prune(pg_app, "--older-than", "30", answer="")
    assert result.exit_code == 0 and "0 conversations (0 messages) have had no activity for 30 days" in result.output
    assert "Delete them?" not in result.output
    assert message_counts() == {"fresh": 2}


def test_prune_deletes_more_than_one_batch(pg_app):
    """Over a thousand old conversations are all deleted and counted."""
    old = models.utcnow() - datetime.timedelta(days=90)
    with models.db.connection_context():
        models.Conversation.insert_many(
            [{"id": f"old-{n}", "owner": "alice", "created_at": old, "updated_at": old} for n in range(1201)]
        ).execute()
        keys = [c.key for c in models.Conversation.select(models.Conversation.key)]
        models.Message.insert_many([{"conversation": key, "role": "user", "content": "x"} for key in keys]).execute()
    make_turn(pg_app, "fresh")
    result = prune(pg_app, "--older-than", "30")
    assert re.search(r"\bdeleted 1201\b", result.output), result.output
    assert message_counts() == {"fresh": 2}


def test_prune_says_what_it_would_delete_and_asks_first(pg_app):
    """Without --yes, prune counts what is old, asks, and deletes nothing when the answer is no."""
    make_turn(pg_app, "old", datetime.timedelta(days=40))
    make_turn(pg_app, "fresh")
    result = prune(pg_app, "--older-than", "0", answer="n\n")
    assert "2 conversations (4 messages) have had no activity for 0 days" in result.output
    assert "Delete them?" in result.output and result.exit_code == 1
    assert message_counts() == {"old": 2, "fresh": 2}
    result = prune(pg_app, "--older-than", "30", answer="y\n")
    assert result.exit_code == 0 and re.search(r"\bdeleted 1\b", result.output)
    assert message_counts() == {"fresh": 2}


@pytest.mark.parametrize("args", [[], ["--older-than"], ["--older-than", "-1"], ["--older-than", "abc"]],
                         ids=["missing", "no-value", "negative", "not-a-number"])
def test_prune_without_a_valid_age_fails_and_deletes_nothing(pg_app, args):
    """--older-than is required and must be a whole number of days, at least 0."""
    make_turn(pg_app, "old", datetime.timedelta(days=40))
    result = prune(pg_app, *args, answer="")
    assert result.exit_code != 0
    assert message_counts() == {"old": 2}

