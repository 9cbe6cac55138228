"""For the team that runs it: usage per user, a daily token budget, Prometheus metrics."""

import csv
import datetime
import io
import json
import math
import re
import signal
import threading

import pytest
import requests

import coordination
import models
from tests.fake_llm import Script
from tests.helpers import (assert_error, bearer, kill_hard, lines_for, message_rows, read_events, slow_stream, through,
                           wait_until)
from tests.sse_client import data_events, rest_of

TODAY = datetime.datetime.now(datetime.timezone.utc).date()


def turn_on(day, owner, conversation_id, model, prompt_tokens, completion_tokens, token_source="model"):
    """A finished turn of `owner` saved as of `day` (noon UTC)."""
    with models.db.connection_context():
        models.save_turn(conversation_id=conversation_id, owner=owner, message="q", reply="a", status="complete",
                         prompt_tokens=prompt_tokens, reply_tokens=completion_tokens, model=model,
                         token_source=token_source)
        noon = datetime.datetime.combine(day, datetime.time(12))
        conversation = models.Conversation.owned(owner, conversation_id)
        models.Message.update(created_at=noon).where(models.Message.conversation == conversation.key).execute()


# Usage

def test_usage_gives_the_callers_own_tokens_and_turns_per_day_and_model(pg_client):
    """GET /usage sums the caller's turns per day and model, says which were estimated, and shows nobody else's."""
    yesterday = TODAY - datetime.timedelta(days=1)
    turn_on(yesterday, "alice", "a1", "gpt-4o-mini", 100, 20)
    turn_on(yesterday, "alice", "a2", "gpt-4o-mini", 50, 5, token_source="estimate")
    turn_on(TODAY, "alice", "a3", "llama3", 10, 1)
    turn_on(TODAY, "bob", "b1", "gpt-4o-mini", 999, 999)
    body = pg_client.get("/usage", headers=bearer()).get_json()
    assert body["days"] == [
        {"date": yesterday.isoformat(), "model": "gpt-4o-mini", "turns": 2, "prompt_tokens": 150,
         "completion_tokens": 25, "estimated_turns": 1},
        {"date": TODAY.isoformat(), "model": "llama3", "turns": 1, "prompt_tokens": 10, "completion_tokens": 1,
         "estimated_turns": 0}]
    assert body["total"] == {"turns": 3, "prompt_tokens": 160, "completion_tokens": 26, "estimated_turns": 1}
    assert body["until"] == TODAY.isoformat()


def test_usage_is_bounded_by_since_and_until(pg_client):
    """Only the days asked for count, both ends included."""
    for days_back in (0, 3, 10):
        turn_on(TODAY - datetime.timedelta(days=days_back), "alice", f"c{days_back}", "m", 1, 1)
    since, until = TODAY - datetime.timedelta(days=10), TODAY - datetime.timedelta(days=3)
    body = pg_client.get(f"/usage?since={since}&until={until}", headers=bearer()).get_json()
    assert [day["date"] for day in body["days"]] == [since.isoformat(), until.isoformat()]


@pytest.mark.parametrize("query", ["since=yesterday", "until=2026-13-01", "since=2026-12-02&until=2026-12-01",
                                   "since=2020-01-01&until=2026-01-01", "since=2026-1-1"])
def test_usage_refuses_dates_it_cannot_read(pg_client, query):
    """A bad date, an inverted range or one over a year is a 400."""
    assert_error(pg_client.get(f"/usage?{query}", headers=bearer()), 400, "invalid_request")


@pytest.mark.parametrize("since, until", [("0001-01-01", "0001-01-01"), ("9999-12-31", "9999-12-31"),
                                          ("9999-01-01", "9999-12-31"), ("0001-01-01", "0001-12-31")])
def test_usage_answers_for_the_first_and_last_days_a_date_can_name(client, since, until):
    """The edges of the calendar are days like any other: no turns on them, and no error."""
    response = client.get(f"/usage?since={since}&until={until}", headers=bearer())
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json() == {"since": since, "until": until, "days": [],
                                   "total": {"turns": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                             "estimated_turns": 0}}


def test_usage_needs_a_token(pg_client):
    """GET /usage without a token is 401."""
    assert_error(pg_client.get("/usage"), 401, "unauthorized")


def test_a_turn_records_its_model_and_whether_its_counts_are_the_models(client, llm):
    """A reply with the model's usage is kept as such; one without is kept as an estimate (on each backend)."""
    llm.script(Script(reply="four words of reply", model="served-model"), Script(reply="x", usage=False))
    client.post("/chat/run", json={"message": "hi", "conversation_id": "c1"}, headers=bearer())
    client.post("/chat/run", json={"message": "hi", "conversation_id": "c2"}, headers=bearer())
    days = client.get("/usage", headers=bearer()).get_json()["days"]
    assert {(d["model"], d["estimated_turns"]) for d in days} == {("served-model", 0), ("fake-model", 1)}


@pytest.mark.parametrize("usage", [{"completion_tokens": 3}, {"prompt_tokens": 0, "completion_tokens": 3}],
                         ids=["no-prompt-tokens", "zero-prompt-tokens"])
def test_counts_are_the_models_only_if_it_reported_both(pg_client, llm, usage):
    """A model that reports its completion tokens but not its prompt's: the prompt is estimated, so the turn is too."""
    llm.script(Script(reply="one two three", usage_value=usage))
    with pg_client.post("/chat/stream", json={"message": "hi", "conversation_id": "c1"}, headers=bearer()) as stream:
        final = [json.loads(line[6:]) for line in stream.get_data(as_text=True).splitlines()
                 if line.startswith("data: ")][-1]
    assert (final["metrics"]["completion_tokens"], final["metrics"]["token_source"]) == (3, "estimate")
    [day] = pg_client.get("/usage", headers=bearer()).get_json()["days"]
    assert day["estimated_turns"] == 1


def usage_cli(app, *args):
    """Run `flask usage ARGS`; the click result."""
    return app.test_cli_runner().invoke(args=["usage", *args])


def test_the_usage_command_sums_per_user_in_every_format(pg_app):
    """`flask usage` gives each user and model's totals as a table, CSV or JSON, for a user or all."""
    turn_on(TODAY, "alice", "a1", "m1", 10, 2)
    turn_on(TODAY - datetime.timedelta(days=2), "alice", "a2", "m1", 5, 1)
    turn_on(TODAY, "bob", "b1", "m2", 7, 3, token_source="estimate")
    table = usage_cli(pg_app, "--since", "7d")
    assert table.exit_code == 0, table.output
    assert re.search(r"^alice\s+m1\s+2\s+15\s+3\s+0$", table.output, re.M)
    assert re.search(r"^bob\s+m2\s+1\s+7\s+3\s+1$", table.output, re.M)
    rows = list(csv.DictReader(io.StringIO(usage_cli(pg_app, "--format", "csv", "--user", "bob").output)))
    assert rows == [{"user": "bob", "model": "m2", "turns": "1", "prompt_tokens": "7", "completion_tokens": "3",
                     "estimated_turns": "1"}]
    report = json.loads(usage_cli(pg_app, "--format", "json", "--since", TODAY.isoformat()).output)
    assert {(u["user"], u["turns"]) for u in report["users"]} == {("alice", 1), ("bob", 1)}


def test_the_usage_command_refuses_a_since_it_cannot_read(pg_app):
    """--since must be a date or a number of days."""
    result = usage_cli(pg_app, "--since", "last week")
    assert result.exit_code == 2 and "--since" in result.output


# The daily budget

@pytest.fixture
def budgeted(make_pg_app, redis_client):
    """An app whose users may spend 100 tokens a day."""
    return make_pg_app(TOKEN_BUDGET_PER_DAY=100)


def test_past_the_budget_a_turn_is_429_before_the_model_is_asked(budgeted, llm, redis_client):
    """Once today's spending reaches the budget: 429 budget_exceeded with when it resets; the model is not asked."""
    client = budgeted.test_client()
    llm.script(*[Script(reply="word " * 30) for _ in range(5)])
    statuses = [client.post("/chat/run", json={"message": "hi", "conversation_id": f"c{n}"},
                            headers=bearer()).status_code for n in range(5)]
    assert statuses[0] == 200 and 429 in statuses
    asked = len(llm.requests)
    refused = client.post("/chat/run", json={"message": "hi", "conversation_id": "late"}, headers=bearer())
    assert_error(refused, 429, "budget_exceeded")
    assert "resets at" in refused.get_json()["error"]["message"]
    assert 0 < int(refused.headers["Retry-After"]) <= 86400
    assert len(llm.requests) == asked
    assert client.post("/chat/run", json={"message": "hi", "conversation_id": "c9"},
                       headers=bearer("bob")).status_code == 200


def test_budget_retry_after_is_never_before_midnight(budgeted, llm):
    """Retry-After counts whole seconds up to midnight UTC, rounded up: a client that waits it is never early."""
    turn_on(TODAY, "alice", "earlier", "m", 80, 30)
    asked_at = datetime.datetime.now(datetime.timezone.utc)
    refused = budgeted.test_client().post("/chat/run", json={"message": "hi", "conversation_id": "c1"},
                                          headers=bearer())
    answered_at = datetime.datetime.now(datetime.timezone.utc)
    assert_error(refused, 429, "budget_exceeded")
    midnight = datetime.datetime.combine(TODAY + datetime.timedelta(days=1), datetime.time(),
                                         tzinfo=datetime.timezone.utc)
    retry_after = int(refused.headers["Retry-After"])
    assert (midnight - answered_at).total_seconds() <= retry_after <= math.ceil((midnight - asked_at).total_seconds())


def test_a_turn_saved_after_its_process_died_counts_as_the_database_counts_it(start_service, llm, redis_client):
    """A turn whose instance was killed is saved by the next one with its reply's estimate, and the count in
    Redis adds what the database's sum adds for it (its reply; the prompt was never known)."""
    settings = {"TOKEN_BUDGET_PER_DAY": 100000, "LEASE_SECONDS": 2}
    doomed, survivor = start_service(**settings), start_service(**settings)
    llm.script(Script(chunks=[f"word{n} " for n in range(40)], chunk_delay=0.1))
    with doomed.stream("tell me a long one, please, with many words", "c1") as response:
        assert len(read_events(response, stop_after=10)) == 10
        kill_hard(doomed)
    llm.script(*[Script(reply="still here") for _ in range(100)])
    assert wait_until(lambda: survivor.run("are you there?", "c1").status_code == 200, timeout=20, interval=0.5)
    assert [m["status"] for m in message_rows("c1")] == ["complete", "interrupted", "complete", "complete"]
    assert int(redis_client.get(spent_key())) == database_spent()


def test_a_turn_begun_within_the_budget_finishes(start_service, llm):
    """The budget is checked when a turn begins: a long reply that goes past it is streamed to its end."""
    service = start_service(TOKEN_BUDGET_PER_DAY=10)
    llm.script(Script(chunks=["word "] * 50))
    with service.stream("hi", "c1") as response:
        received = data_events(response)
    assert "error" not in received[-1] and len(received) == 51
    assert_error(service.run("again", "c2"), 429, "budget_exceeded")


def spent_key(user="alice"):
    """The Redis key of the user's count of today's tokens."""
    return coordination.SPENT_KEY.format(user, TODAY.isoformat())


def database_spent(user="alice"):
    """The tokens the database's kept turns say the user spent today."""
    midnight = datetime.datetime.combine(TODAY, datetime.time())
    with models.db.connection_context():
        return models.Message.spent(user, midnight, midnight + datetime.timedelta(days=1))


def test_the_budget_is_shared_by_every_instance(start_service, llm, redis_client):
    """Both instances add to one count in Redis, and refuse by it even when the database has forgotten the turns."""
    first, second = start_service(TOKEN_BUDGET_PER_DAY=40), start_service(TOKEN_BUDGET_PER_DAY=40)
    llm.script(Script(reply="word " * 20), Script(reply="word " * 20))
    assert first.run("hi", "c1").status_code == 200
    assert second.run("hi", "c2").status_code == 200
    assert int(redis_client.get(spent_key())) == database_spent() == 2 * (1 + 20)
    with models.db.connection_context():
        models.Message.delete().execute()  # only the count in Redis remembers the 42 tokens now
    assert_error(first.run("hi", "c3"), 429, "budget_exceeded")
    assert_error(second.run("hi", "c4"), 429, "budget_exceeded")


def redis_round_trips(app, message, conversation_id):
    """How many round trips to Redis a /chat/run turn of `message` makes (the request's own, not the keeper's)."""
    link = app.extensions["coordination"].link
    made = []
    call = link.call

    def counted(operation, *args, **kwargs):
        """Count the request thread's round trips."""
        if threading.current_thread() is threading.main_thread():
            made.append(operation)
        return call(operation, *args, **kwargs)

    link.call = counted
    try:
        response = app.test_client().post("/chat/run", json={"message": message, "conversation_id": conversation_id},
                                          headers=bearer())
    finally:
        del link.call
    assert response.status_code == 200, response.get_json()
    return len(made)


def test_the_budget_adds_no_round_trip_to_a_turn(make_pg_app, llm, redis_client):
    """With a budget, a turn (once the day's count is there) makes as many round trips to Redis as without one."""
    without = make_pg_app()
    redis_round_trips(without, "first", "c0")
    unbudgeted = redis_round_trips(without, "hi", "c1")
    redis_client.flushdb()
    budgeted = make_pg_app(TOKEN_BUDGET_PER_DAY=1000)
    redis_round_trips(budgeted, "first", "c0")
    counted_before = int(redis_client.get(spent_key()))
    assert redis_round_trips(budgeted, "hi", "c1") == unbudgeted
    assert int(redis_client.get(spent_key())) > counted_before


def test_a_count_redis_lost_is_rebuilt_from_the_database(budgeted, llm, redis_client):
    """With Redis emptied, today's spending comes back from the kept turns: still refused."""
    turn_on(TODAY, "alice", "earlier", "m", 80, 30)
    redis_client.flushdb()
    assert_error(budgeted.test_client().post("/chat/run", json={"message": "hi", "conversation_id": "c1"},
                                             headers=bearer()), 429, "budget_exceeded")
    assert llm.requests == []
    assert int(redis_client.get(spent_key())) == 110


def test_a_count_lost_while_a_turn_runs_is_not_made_again_from_that_turn_alone(start_service, llm, redis_client):
    """Redis loses the count while a turn streams on one instance: the turn's end does not start a count of its own
    tokens, so the next turn, on another instance, counts from the database and is refused."""
    first, second = start_service(TOKEN_BUDGET_PER_DAY=100), start_service(TOKEN_BUDGET_PER_DAY=100)
    turn_on(TODAY, "alice", "earlier", "m", 80, 18)
    with slow_stream(first, llm, "c1") as received:
        assert int(redis_client.get(spent_key())) == 98
        redis_client.delete(spent_key())
        llm.release()
        assert "error" not in rest_of(received)[-1]
    assert database_spent() > 100 - 1
    assert redis_client.get(spent_key()) is None
    assert_error(second.run("hi", "c2"), 429, "budget_exceeded")
    assert int(redis_client.get(spent_key())) == database_spent()


def test_a_count_is_built_again_from_the_database_a_while_after_it_was(budgeted, llm, redis_client, monkeypatch):
    """Tokens the count missed (Redis was unreachable when a turn ended) count again once the count expires:
    it lives SPENT_RECOUNT_SECONDS from when it was built, however many turns add to it."""
    monkeypatch.setattr(coordination, "SPENT_RECOUNT_SECONDS", 1)
    client = budgeted.test_client()
    answered = client.post("/chat/run", json={"message": "hi", "conversation_id": "c1"}, headers=bearer())
    assert answered.status_code == 200
    assert 0 < redis_client.pttl(spent_key()) <= 1000
    turn_on(TODAY, "alice", "missed", "m", 80, 30)  # saved while Redis was away: the count never heard of it
    assert wait_until(lambda: redis_client.exists(spent_key()) == 0, timeout=10)
    assert_error(client.post("/chat/run", json={"message": "hi", "conversation_id": "c2"}, headers=bearer()),
                 429, "budget_exceeded")
    assert int(redis_client.get(spent_key())) == database_spent()


def test_without_a_budget_nothing_is_counted(pg_client, llm, redis_client):
    """TOKEN_BUDGET_PER_DAY is off by default: no count is kept."""
    pg_client.post("/chat/run", json={"message": "hi", "conversation_id": "c1"}, headers=bearer())
    assert redis_client.keys("chat:spent:*") == []


# Metrics

def scrape(service, token=None, worker=None):
    """GET /metrics (on the `worker` session's connection, if given); the response."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if worker is not None:
        return worker.get(service.url + "/metrics", headers=headers, timeout=10)
    return requests.get(service.url + "/metrics", headers={**headers, "Connection": "close"}, timeout=10)


def worker_of(service, request_id):
    """The pid of the worker that answered the request of `request_id` (its request-log line says)."""
    assert wait_until(lambda: lines_for(service, request_id), timeout=10)
    return lines_for(service, request_id)[0]["pid"]


@pytest.fixture
def workers():
    """Sessions that each keep one connection to one worker of a service: `workers(service, n)` gives n,
    each on another worker, so a test chooses which worker answers."""
    opened = []

    def one_on_each(service, count=2):
        """`count` sessions, each answered by a worker of its own."""
        found = {}
        for attempt in range(200):
            session = requests.Session()
            opened.append(session)
            request_id = f"which-worker-{attempt}"
            assert session.get(service.url + "/status", headers={"X-Request-Id": request_id},
                               timeout=10).status_code == 200
            found.setdefault(worker_of(service, request_id), session)
            if len(found) == count:
                return list(found.values())
        raise AssertionError(f"fewer than {count} workers answered 200 connections")

    yield one_on_each
    for session in opened:
        session.close()


def turn_on_worker(worker, service, path, message, conversation_id):
    """A whole turn on `path` ("/chat/run" or "/chat/stream") on the worker's connection; the response."""
    response = worker.post(service.url + path, json={"message": message, "conversation_id": conversation_id},
                           headers=bearer(), timeout=30)
    response.content  # noqa: B018 - read it all, so the turn is over when this returns
    return response


def sample(text, name, **labels):
    """The value of one sample of the Prometheus text, or None."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        metric, _, value = line.rpartition(" ")
        found_name, _, found_labels = metric.partition("{")
        found = ",".join(sorted(found_labels.rstrip("}").split(","))) if found_labels else ""
        if found_name == name and found == wanted:
            return float(value)
    return None


def test_metrics_count_requests_turns_tokens_and_errors_over_two_workers(start_service, llm, workers):
    """Requests by route and status, turns by outcome, first tokens and durations, tokens by model and model
    errors, summed over both workers (each ran turns); no user id or message text in them."""
    service = start_service(workers=2)
    first, second = workers(service, 2)
    llm.script(Script(reply="three word reply", model="m-1"), Script(chunks=["a ", "b"], model="m-1"),
               Script(status=500))
    assert turn_on_worker(first, service, "/chat/run", "secret message text", "c1").status_code == 200
    assert turn_on_worker(second, service, "/chat/stream", "secret message text", "c1").status_code == 200
    assert turn_on_worker(second, service, "/chat/run", "secret message text", "c1").status_code == 502
    text = ""

    def counted():
        """Whether the metrics show all three turns (the workers write them as they end)."""
        nonlocal text
        text = scrape(service).text
        return sample(text, "chat_turns_total", kind="stream", outcome="complete") == 1

    assert wait_until(counted, timeout=10)
    assert sample(text, "chat_turns_total", kind="run", outcome="complete") == 1
    assert sample(text, "chat_turns_total", kind="run", outcome="error") == 1
    assert sample(text, "chat_requests_total", route="/chat/run", method="POST", status="200") == 1
    assert sample(text, "chat_requests_total", route="/chat/run", method="POST", status="502") == 1
    assert sample(text, "chat_model_errors_total", code="llm_error") == 1
    assert sample(text, "chat_tokens_total", model="m-1", type="completion") == 5
    assert sample(text, "chat_time_to_first_token_seconds_count") == 1
    assert sample(text, "chat_turn_duration_seconds_count", kind="run") == 2
    assert sample(text, "chat_part_up", part="database") == 1 and sample(text, "chat_part_up", part="cache") == 1
    assert "secret message text" not in text and "alice" not in text and "c1" not in text


def test_an_outage_shows_as_0_whichever_worker_says_it(start_service, pg_proxy, workers):
    """A part that goes down is 0 as soon as the worker scraped sees it, though the other worker last saw it up."""
    service = start_service(workers=2, DATABASE_URL=through(pg_proxy))
    first, second = workers(service, 2)
    for worker in (first, second):
        assert sample(scrape(service, worker=worker).text, "chat_part_up", part="database") == 1
    pg_proxy.stop()
    assert wait_until(lambda: sample(scrape(service, worker=first).text, "chat_part_up", part="database") == 0,
                      timeout=10)
    assert wait_until(lambda: sample(scrape(service, worker=second).text, "chat_part_up", part="database") == 0,
                      timeout=10)


def test_open_streams_are_a_live_gauge(start_service, llm):
    """A stream being read counts while it is open, and not after."""
    service = start_service()
    llm.script(Script(chunks=["a", "b"], chunk_delay=30))
    with service.stream("hi", "c1") as response:
        assert response.status_code == 200
        assert wait_until(lambda: sample(scrape(service).text, "chat_open_streams") == 1, timeout=10)
        llm.release()
        data_events(response)
    assert wait_until(lambda: sample(scrape(service).text, "chat_open_streams") == 0, timeout=10)


def test_metrics_token_is_required_when_set(start_service):
    """With METRICS_TOKEN, /metrics needs it as a bearer token; a user's token is not it."""
    service = start_service(METRICS_TOKEN="scraper-secret-123")
    assert_error(scrape(service), 401, "unauthorized")
    assert_error(scrape(service, "wrong"), 401, "unauthorized")
    answer = scrape(service, "scraper-secret-123")
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/plain")
    assert "chat_requests_total" in answer.text


def test_metrics_can_be_turned_off(start_service):
    """METRICS=off: no /metrics."""
    assert_error(scrape(start_service(METRICS="off")), 404, "not_found")


def test_a_named_metrics_folder_is_emptied_when_gunicorn_starts_and_kept_when_it_exits(start_service, tmp_path):
    """A named PROMETHEUS_MULTIPROC_DIR is emptied at start (no counts from a previous run) and kept."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / "counter_1.db").write_bytes(b"stale")
    service = start_service(PROMETHEUS_MULTIPROC_DIR=str(folder))
    assert not (folder / "counter_1.db").exists()
    assert scrape(service).status_code == 200
    assert list(folder.glob("*.db"))
    service.stop()
    assert service.process.returncode == 0
    assert list(folder.glob("*.db"))


@pytest.mark.parametrize("reloaded", [False, True], ids=["run", "reloaded-by-sighup"])
def test_gunicorn_makes_a_metrics_folder_and_removes_it_when_it_exits(start_service, tmp_path, reloaded):
    """Without PROMETHEUS_MULTIPROC_DIR gunicorn makes a temporary folder the workers write to, and removes it
    at exit, also after SIGHUP (which reads gunicorn.conf.py again) replaced the workers."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    service = start_service(TMPDIR=str(temporary))
    [folder] = temporary.glob("chat-metrics-*")
    assert scrape(service).status_code == 200
    assert list(folder.glob("*.db"))
    if reloaded:
        service.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: service.output().count("Booting worker") == 2, timeout=20)
        assert wait_until(lambda: scrape(service).status_code == 200, timeout=20)
        assert list(temporary.glob("chat-metrics-*")) == [folder]
    service.stop()
    assert service.process.returncode == 0
    assert list(temporary.iterdir()) == []
