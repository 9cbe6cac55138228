"""Turns that outlive their connection and their process: event ids, resume from any instance, grace, crashes.

Real gunicorn + gevent services (two where a test crosses instances), PostgreSQL, Redis and
the fake model.
"""

import os
import re
import signal
import time

import models
from tests.helpers import descendants, read_events, resume, stored_messages, wait_until
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


def assert_whole_turn(got):
    """Events numbered 1, 2, 3... of one turn, exactly one final event, and it is the last."""
    assert [number(i) for i, _ in got] == list(range(1, len(got) + 1))
    assert len({i.split(":")[0] for i, _ in got}) == 1
    assert [p["is_final"] for _, p in got] == [False] * (len(got) - 1) + [True]


def kill_hard(service):
    """SIGKILL the service's master and workers at once, as a lost host or the OOM killer would."""
    for pid in [service.process.pid, *descendants(service.process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    service.process.wait(10)


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


def test_two_readers_at_once_both_get_every_event(start_service, llm):
    """The asking client and a second tab on another instance see the same events."""
    first, second = start_service(), start_service()
    llm.script(paced(0.05))
    with first.stream("tell me", "c1") as direct:
        assert direct.status_code == 200
        with resume(second, "c1") as tab:
            from_tab = read_events(tab)
        from_direct = read_events(direct)
    assert from_direct == from_tab
    assert_whole_turn(from_direct)


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
    """The model request is closed once STREAM_RESUME_GRACE_SECONDS pass with no reader."""
    service = start_service(STREAM_RESUME_GRACE_SECONDS=1)
    llm.script(paced(0.2))
    with service.stream("tell me", "c1") as response:
        got = read_events(response, stop_after=2)
    assert llm.wait_for_disconnects(1, timeout=10)
    assert wait_until(lambda: len(stored_messages("c1", "alice")) == 2, timeout=10)
    role, content, status = stored_messages("c1", "alice")[1]
    assert status == "interrupted" and content.startswith(text_of(got)) and content != "".join(WORDS)


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


def test_on_the_embedded_defaults_a_stream_resumes_within_the_process(start_service, llm, postgres, tmp_path):
    """SQLite and the in-process cache: drop and resume on the same service."""
    url = f"sqlite:///{tmp_path / 'chat.db'}"
    sqlite = models.open_database(url, 1, 5)
    with models.db.connection_context():
        models.create_tables()
    sqlite.close_all()
    models.db.initialize(postgres)
    service = start_service(DATABASE_URL=url, REDIS_URL="", **GRACE)
    llm.script(paced(0.05))
    with service.stream("tell me", "c1") as response:
        got = read_events(response, stop_after=4)
    with resume(service, "c1", got[-1][0]) as rest:
        got += read_events(rest)
    assert_whole_turn(got)
    assert text_of(got) == "".join(WORDS)


def test_a_resumed_stream_counts_against_the_users_streams(start_service, llm):
    """Resuming opens a stream like any other: past MAX_STREAMS_PER_USER it is 429."""
    service = start_service(MAX_STREAMS_PER_USER=1)
    llm.script(paced(0.2))
    with service.stream("tell me", "c1") as response:
        assert response.status_code == 200
        refused = resume(service, "c1")
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_streams"
        llm.release()
