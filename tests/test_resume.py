"""Turns that outlive their connection and their process: event ids, resume from any instance, grace, crashes.

Real gunicorn + gevent services (two where a test crosses instances), PostgreSQL, Redis and
the fake model.
"""

import re
import signal
import threading
import time

import pytest
import requests

import journal
import models
from journal import JournalUnavailable
from redis_link import scope
from tests.helpers import (SLOW_REPLY, assert_error, bearer, kill_hard, read_events, resume,
                           stored_messages, take_events, wait_until)
from tests.fake_llm import Script
from tests.sse_client import PING, events_with_ids

WORDS = [f"word{n} " for n in range(40)]
GRACE = {"STREAM_RESUME_GRACE_SECONDS": 20}  # the default, which the test services set to 0
EVENT_ID = re.compile(r"[0-9a-f]{16}:[0-9]+")


def paced(delay=0.1, words=WORDS):
    """A streamed reply of `words`, one every `delay` seconds."""
    return Script(chunks=list(words), chunk_delay=delay)


def number(event_id):
    """The event number of an id."""
    return int(event_id.rsplit(":", 1)[1])


def text_of(got):
    """The reply pieced together from events."""
    return "".join(payload["content"] for _, payload in got)


def last_id(got):
    """The Last-Event-ID an SSE client keeps after `got`: the id of the last event that had one."""
    return [event_id for event_id, _ in got if event_id is not None][-1]


def assert_whole_turn(got):
    """Events numbered 1, 2, 3... of one turn, exactly one final event, and it is the last."""
    assert [number(i) for i, _ in got] == list(range(1, len(got) + 1))
    assert len({i.split(":")[0] for i, _ in got}) == 1
    assert [p["is_final"] for _, p in got] == [False] * (len(got) - 1) + [True]


def test_every_event_carries_an_id_unique_across_turns(service, llm):
    """`id: <turn>:<n>` on every event; the data is as before; ids of two turns never meet."""
    ids = []
    for _ in range(2):
        llm.script(paced(0, ["a ", "b"]))
        with service.stream("hi", "c1") as response:
            got = read_events(response)
        assert_whole_turn(got)
        assert all(EVENT_ID.fullmatch(i) for i, _ in got)
        assert [p["content"] for _, p in got] == ["a ", "b", ""]
        ids += [i for i, _ in got]
    assert len(set(ids)) == len(ids)


def test_a_dropped_stream_resumes_on_the_other_instance_with_nothing_missed_or_repeated(start_service, llm):
    """Drop after 5 events, resume on instance two from Last-Event-ID: the rest, once, and the saved reply."""
    first, second = start_service(**GRACE), start_service(**GRACE)
    llm.script(paced())
    with first.stream("tell me", "c1") as response:
        got = read_events(response, stop_after=5)
    with resume(second, "c1", got[-1][0]) as rest:
        assert rest.status_code == 200
        got += read_events(rest)
    assert_whole_turn(got)
    assert text_of(got) == "".join(WORDS)
    assert stored_messages("c1", "alice")[1] == ("assistant", "".join(WORDS), "complete")


@pytest.mark.parametrize("where", ["on another instance", "on the same instance"])
def test_two_readers_at_once_both_get_every_event(start_service, llm, where):
    """The asking client and a second tab see the same events, both while the turn is live: each has its first
    chunk before the model sends the rest."""
    first = start_service(LLM_TIMEOUT_SECONDS=20)
    second = start_service(LLM_TIMEOUT_SECONDS=20) if where == "on another instance" else first
    llm.script(Script(chunks=[f"w{n} " for n in range(10)], chunk_delay=30))  # the rest waits for llm.release()
    with first.stream("tell me", "c1") as direct, resume(second, "c1") as tab:
        assert (direct.status_code, tab.status_code) == (200, 200)
        from_direct, from_tab = events_with_ids(direct), events_with_ids(tab)
        got_direct, got_tab = take_events(from_direct, stop_after=1), take_events(from_tab, stop_after=1)
        llm.release()
        got_direct += take_events(from_direct)
        got_tab += take_events(from_tab)
    assert got_direct == got_tab
    assert_whole_turn(got_direct)
    assert text_of(got_direct) == "".join(f"w{n} " for n in range(10))


def test_a_replay_cut_short_leaves_the_client_its_last_real_event_id(start_service, llm):
    """Instance two, following instance one's turn, shuts down: its made-up final event has no id, so the
    client resumes on instance one from the last real event, and misses nothing."""
    first, second = start_service(**GRACE), start_service(**GRACE, GRACEFUL_TIMEOUT=5)
    words = [f"w{n} " for n in range(100)]
    llm.script(paced(0.1, words))  # 10 s: still running when instance two cuts its reader, 2 s after SIGTERM
    with first.stream("tell me", "c1") as response:
        got = read_events(response, stop_after=1)
    with resume(second, "c1", got[-1][0]) as followed:
        received = events_with_ids(followed)
        got += take_events(received, stop_after=3)
        second.process.send_signal(signal.SIGTERM)
        got += take_events(received)
    cut_id, cut = got.pop()
    assert cut["is_final"] and cut["error"]["code"] == "shutting_down", cut
    assert cut_id is None
    with resume(first, "c1", last_id(got)) as rest:
        got += read_events(rest)
    assert_whole_turn(got)
    assert text_of(got) == "".join(words)


def test_resume_after_the_end_replays_the_missed_events_then_nothing_once_not_retained(start_service, llm):
    """Within STREAM_RETAIN_SECONDS the missed events and the final one; after it, 204."""
    service = start_service(STREAM_RETAIN_SECONDS=3, STREAM_RESUME_GRACE_SECONDS=20)
    llm.script(paced(0, ["one ", "two ", "three"]))
    with service.stream("count", "c1") as response:
        got = read_events(response)
    with resume(service, "c1", got[0][0]) as again:
        assert [p["content"] for _, p in read_events(again)] == ["two ", "three", ""]
    with resume(service, "c1", got[-1][0]) as nothing_after_the_end:
        assert nothing_after_the_end.status_code == 204
    assert wait_until(lambda: resume(service, "c1").status_code == 204, timeout=15, interval=0.5)


def test_resume_is_404_for_a_conversation_the_user_does_not_have(service, llm):
    """Bob resuming alice's conversation id finds nothing of his: 404, as for any unknown id."""
    llm.script(paced(0, ["hi"]))
    with service.stream("hi", "c1") as response:
        read_events(response)
    assert resume(service, "c1", user="bob").status_code == 404
    assert resume(service, "never-was").status_code == 404


def test_resume_refuses_a_last_event_id_it_did_not_make(service):
    """A Last-Event-ID that is not turn:number is a 400."""
    response = resume(service, "c1", "not an id")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request"


def test_with_no_reader_within_the_grace_the_model_is_stopped_and_the_turn_saved_interrupted(start_service, llm):
    """The model request stays open for STREAM_RESUME_GRACE_SECONDS after the client left, and is closed once
    they pass with no reader."""
    grace = 2
    service = start_service(STREAM_RESUME_GRACE_SECONDS=grace)
    llm.script(paced(0.2))  # 8 s: longer than the grace
    with service.stream("tell me", "c1") as response:
        got = read_events(response, stop_after=2)
    left_at = time.monotonic()
    assert llm.wait_for_disconnects(1, timeout=10)
    assert llm.disconnect_times[0] - left_at >= 0.8 * grace
    assert wait_until(lambda: len(stored_messages("c1", "alice")) == 2, timeout=10)
    role, content, status = stored_messages("c1", "alice")[1]
    assert status == "interrupted" and content.startswith(text_of(got)) and content != "".join(WORDS)


def test_a_reader_who_leaves_another_instance_gets_a_whole_grace_before_the_turn_is_cut(start_service, llm):
    """The asking client leaves; a reader on instance two stays past the grace, then leaves too: the model
    stream stays open for a whole grace after that reader left, then is closed as nobody came back."""
    grace = 3
    first, second = (start_service(STREAM_RESUME_GRACE_SECONDS=grace) for _ in range(2))
    llm.script(paced(0.1, [f"w{n} " for n in range(150)]))  # 15 s: longer than all of it
    with first.stream("tell me", "c1") as response:
        got = read_events(response, stop_after=1)
    with resume(second, "c1", got[-1][0]) as tab:
        got += read_events(tab, stop_after=50)  # about 5 s, past the grace the asking client left
    left_at = time.monotonic()
    assert llm.wait_for_disconnects(1, timeout=20)
    assert llm.disconnect_times[0] - left_at >= 0.8 * grace
    assert wait_until(lambda: len(stored_messages("c1", "alice")) == 2)
    assert stored_messages("c1", "alice")[1][2] == "interrupted"


def test_a_reader_who_comes_back_within_the_grace_keeps_the_turn_going_to_complete(start_service, llm):
    """The model keeps going while nobody reads; a reader within the grace gets it to the end."""
    service = start_service(STREAM_RESUME_GRACE_SECONDS=5)
    llm.script(paced(0.05))
    with service.stream("tell me", "c1") as response:
        got = read_events(response, stop_after=3)
    with resume(service, "c1", got[-1][0]) as back:
        got += read_events(back)
    assert_whole_turn(got)
    assert llm.disconnects == 0
    assert stored_messages("c1", "alice")[1] == ("assistant", "".join(WORDS), "complete")


def test_stop_works_on_a_turn_with_no_reader(start_service, llm):
    """POST /chat/stop reaches a turn whose client left; it is saved stopped."""
    service = start_service(STREAM_RESUME_GRACE_SECONDS=30)
    llm.script(paced(0.2))
    with service.stream("tell me", "c1") as response:
        read_events(response, stop_after=2)
    stopped = service.post("/chat/stop", {"conversation_id": "c1"})
    assert stopped.status_code == 202
    assert llm.wait_for_disconnects(1, timeout=10)
    assert wait_until(lambda: [m[2] for m in stored_messages("c1", "alice")] == ["complete", "stopped"], timeout=10)


def test_an_instance_killed_mid_stream_loses_nothing_and_frees_the_conversation_within_15_s(start_service, llm):
    """SIGKILL mid-stream: the other instance takes a new turn within 15 s, and the history holds the
    user message and the partial reply (interrupted), missing at most the last second of it."""
    doomed, survivor = start_service(), start_service()
    llm.script(paced(0.1))
    with doomed.stream("tell me a long one", "c1") as response:
        got = read_events(response, stop_after=15)
        kill_hard(doomed)
    killed_at = time.monotonic()
    llm.script(Script(reply="I am still here"))

    def takes_a_turn():
        """Whether the survivor answers a turn on the conversation now."""
        return survivor.post("/chat/run", {"message": "are you there?", "conversation_id": "c1"}).status_code == 200

    assert wait_until(takes_a_turn, timeout=20, interval=0.5)
    assert time.monotonic() - killed_at <= 15
    kept = stored_messages("c1", "alice")
    assert [(role, status) for role, _, status in kept] == [
        ("user", "complete"), ("assistant", "interrupted"), ("user", "complete"), ("assistant", "complete")]
    assert kept[0][1] == "tell me a long one"
    partial, seen = kept[1][1], text_of(got)
    assert "".join(WORDS).startswith(partial)
    assert len(partial) >= len(text_of(got[:-10]))  # at most the last second (10 chunks) lost
    assert seen  # the client saw part of it
    assert llm.requests[-1]["json"]["messages"][-3:-1] == [
        {"role": "user", "content": "tell me a long one"}, {"role": "assistant", "content": partial}]


@pytest.mark.parametrize("method, body", [("GET", None), ("PATCH", {"title": "renamed"})])
def test_a_first_turn_whose_instance_died_is_saved_when_the_conversation_is_read_or_renamed(start_service, llm,
                                                                                           method, body):
    """SIGKILL mid-stream of a conversation's first turn: reading or renaming the conversation on the other
    instance saves the journaled turn first (the user message and the partial reply, interrupted), not a 404."""
    doomed, survivor = start_service(LEASE_SECONDS=2), start_service(LEASE_SECONDS=2)
    llm.script(paced(0.1))
    with doomed.stream("tell me a long one", "c1") as response:
        got = read_events(response, stop_after=10)
        kill_hard(doomed)
    answers = []
    assert wait_until(lambda: answers.append(survivor.request(method, "/conversations/c1", body)) or
                      answers[-1].status_code == 200, timeout=15, interval=0.5), answers[-1].text
    kept = stored_messages("c1", "alice")
    assert [(role, status) for role, _, status in kept] == [("user", "complete"), ("assistant", "interrupted")]
    assert kept[0][1] == "tell me a long one"
    assert kept[1][1] and "".join(WORDS).startswith(kept[1][1]) and text_of(got)
    shown = answers[-1].json()
    if method == "GET":
        assert [m["content"] for m in shown["messages"]] == [content for _, content, _ in kept]
    else:
        assert (shown["conversation"]["title"], shown["conversation"]["message_count"]) == ("renamed", 2)


def test_a_stream_whose_runner_cannot_start_lets_the_conversation_go(make_pg_app, llm, monkeypatch):
    """A failure after the model answered but before the turn's runner started: a 500 in the one shape, the
    model's stream closed, and the conversation free for the next turn (not held until the lease expires)."""
    app = make_pg_app()
    service = app.extensions["chat"]

    def broken(*args):
        """A bug, as it would show."""
        raise RuntimeError("a bug")

    monkeypatch.setattr(service.journal, "keep", broken)
    llm.script(SLOW_REPLY)
    client = app.test_client()
    assert_error(client.post("/chat/stream", json={"message": "one", "conversation_id": "c1"}, headers=bearer()),
                 500, "internal_error")
    monkeypatch.undo()
    assert (service.feeds, llm.wait_for_idle(timeout=5)) == ({}, True)
    response = client.post("/chat/stream", json={"message": "two", "conversation_id": "c1"}, headers=bearer())
    assert response.status_code == 200 and b'"is_final": true' in response.get_data()
    assert [content for _, content, _ in stored_messages("c1")] == ["two", "echo: two"]


def test_redis_lost_mid_turn_leaves_the_reader_alone_and_resume_answers_503_until_it_is_back(
        start_service, llm, private_redis):
    """The stream reaches its end and is saved; resume is a clear 503 while Redis is away, and works after."""
    service = start_service(REDIS_URL=private_redis.url)
    llm.script(paced(0.05, WORDS[:20]))
    got = []
    with service.stream("tell me", "c1") as response:
        for event_id, payload in events_with_ids(response):
            if payload != PING:
                got.append((event_id, payload))
            if len(got) == 3 and private_redis.process.poll() is None:
                private_redis.stop()
    assert_whole_turn(got)
    assert "error" not in got[-1][1] and text_of(got) == "".join(WORDS[:20])
    assert stored_messages("c1", "alice")[1] == ("assistant", "".join(WORDS[:20]), "complete")
    refused = resume(service, "c1")
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "resume_unavailable"
    private_redis.start()
    llm.script(paced(0, ["back ", "again"]))

    def resumes():
        """Whether a new turn can be streamed and resumed now."""
        with service.stream("again?", "c1") as again:
            first = read_events(again, stop_after=1)
        if not first:
            return False
        with resume(service, "c1", first[0][0]) as rest:
            return rest.status_code == 200 and read_events(rest)[-1][1]["is_final"]

    assert wait_until(resumes, timeout=20, interval=0.5)


def test_while_redis_is_down_resume_is_404_for_a_conversation_the_user_does_not_have(start_service, llm,
                                                                                     private_redis):
    """With the journal unreadable, ownership is still checked first: 404 for bob and for an unknown id, and the
    503 only for alice's own conversation."""
    service = start_service(REDIS_URL=private_redis.url)
    assert service.run("hi", "c1").status_code == 200
    private_redis.stop()
    assert_error(resume(service, "c1", user="bob"), 404, "not_found")
    assert_error(resume(service, "never-was"), 404, "not_found")
    assert_error(resume(service, "c1"), 503, "resume_unavailable")


@pytest.fixture
def embedded_service(start_service, postgres, tmp_path):
    """The service on the embedded defaults: a SQLite file and the in-process cache, no Redis."""
    url = f"sqlite:///{tmp_path / 'chat.db'}"
    sqlite = models.open_database(url, 1, 5)
    with models.db.connection_context():
        models.create_tables()
    sqlite.close_all()
    models.db.initialize(postgres)
    return start_service(DATABASE_URL=url, REDIS_URL="", **GRACE)


def test_on_the_embedded_defaults_a_stream_resumes_within_the_process(embedded_service, llm):
    """SQLite and the in-process cache: drop and resume on the same service."""
    llm.script(paced(0.05))
    with embedded_service.stream("tell me", "c1") as response:
        got = read_events(response, stop_after=4)
    with resume(embedded_service, "c1", got[-1][0]) as rest:
        got += read_events(rest)
    assert_whole_turn(got)
    assert text_of(got) == "".join(WORDS)


def test_on_the_embedded_defaults_a_run_turn_is_the_one_resume_replays_after_it(embedded_service, llm):
    """A streamed turn, then a /chat/run turn: resume replays the run turn (the most recent), not the one before."""
    llm.script(paced(0, ["streamed ", "reply"]))
    with embedded_service.stream("one", "c1") as response:
        read_events(response)
    llm.script(Script(reply="the run reply"))
    assert embedded_service.run("two", "c1").status_code == 200
    with resume(embedded_service, "c1") as replay:
        got = read_events(replay)
    assert_whole_turn(got)
    assert text_of(got) == "the run reply"


def test_a_resumed_stream_counts_against_the_users_streams(start_service, llm):
    """Resuming opens a stream like any other: past MAX_STREAMS_PER_USER it is 429."""
    service = start_service(MAX_STREAMS_PER_USER=1)
    llm.script(paced(0.2))
    with service.stream("tell me", "c1") as response:
        assert response.status_code == 200
        refused = resume(service, "c1")
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_streams"
        llm.release()


@pytest.mark.parametrize("path", ["/chat/run", "/chat/stream"])
def test_a_turn_after_a_dead_one_whose_journal_cannot_be_read_is_a_503_to_retry(make_pg_app, redis_client,
                                                                                  monkeypatch, path):
    """The journal says a dead process left a turn, then Redis fails before it is read: 503 with Retry-After
    (the dead turn's message must be saved first, to keep the turns in order), and nothing is saved."""
    app = make_pg_app()
    redis_client.xadd(journal.KEY.format(scope("alice", "c1")),
                      {"turn": "0123456789abcdef", "kind": "start", "message": "left by a dead process"})

    def unreadable(name):
        """Redis failed between the journal's start and its read."""
        raise JournalUnavailable("ConnectionError")

    monkeypatch.setattr(app.extensions["chat"].journal, "read", unreadable)
    response = app.test_client().post(path, json={"message": "next", "conversation_id": "c1"}, headers=bearer())
    assert_error(response, 503, "recovery_unavailable")
    assert int(response.headers["Retry-After"]) >= 1
    assert stored_messages("c1") == []


def test_a_reader_who_came_while_the_model_was_asked_is_told_when_the_model_refuses(start_service, llm):
    """A resume that attaches while the model is still being asked gets the refusal as a final event, not pings
    for ever."""
    service = start_service(workers=1, LLM_TIMEOUT_SECONDS=20)
    llm.script(Script(status=502, header_delay=3))
    asking = threading.Thread(target=lambda: service.stream("hi", "c1").close(), daemon=True)
    asking.start()
    assert llm.wait_for_requests(1)  # the turn is being asked for: its feed is up, the model not answered
    with requests.get(f"{service.url}/chat/stream/c1", headers=bearer("alice"), stream=True,
                      timeout=(5, 8)) as attached:
        got = read_events(attached)
    asking.join(10)
    assert [payload["is_final"] for _, payload in got] == [True]
    assert got[0][1]["error"]["code"].startswith("llm_"), got
