"""Races and leaks of turns, leases, stream slots and the journal, against the real service."""

import contextlib
import datetime
import hashlib
import os
import signal
import time

import pytest
import requests

import journal
from cache import RedisCache
from coordination import RedisCoordination
from history import History
from journal import RedisJournal
from redis_link import RedisLink, scope
from tests.fake_llm import Script
from tests.faults import RedisServer
from tests.helpers import (REDIS_URL, complete, descendants, lease_key, read_events, resume, seen_by_model,
                           slow_stream, stored_messages, take_events, wait_until)
from tests.sse_client import PING, events_with_ids, rest_of

pytestmark = pytest.mark.slow


def journal_entries(redis_client, conversation_id, owner="alice"):
    """The (kind, turn) of each entry of the conversation's journal."""
    key = journal.KEY.format(scope(owner, conversation_id))
    return [(fields["kind"], fields["turn"]) for _, fields in redis_client.xrange(key)]


def test_a_turn_refused_for_too_many_streams_is_never_saved(start_service, llm, redis_client):
    """429 too_many_streams means nothing of the turn is kept: not by the next turn's recovery either."""
    service = start_service(MAX_STREAMS_PER_USER=1)
    with slow_stream(service, llm, "a"):
        refused = service.stream("refused message", "b")
        assert refused.status_code == 429, refused.text
        leftover = journal_entries(redis_client, "b")
        llm.release()
    assert service.run("hello", "b").status_code == 200
    assert stored_messages("b") == complete(("hello", "echo: hello"))
    assert leftover == [] or leftover[-1][0] == "abandoned", f"the refused turn left a journal: {leftover}"


def test_resume_after_a_turn_refused_for_too_many_streams_saves_nothing(start_service, llm, redis_client):
    """Resuming a conversation whose only turn was refused (429) has nothing to send, and saves nothing."""
    service = start_service(MAX_STREAMS_PER_USER=1)
    with slow_stream(service, llm, "a"):
        assert service.stream("refused message", "b").status_code == 429
        llm.release()
    assert wait_until(lambda: len(stored_messages("a")) == 2)
    with resume(service, "b") as response:
        status = response.status_code
        body = response.text
    assert (status, stored_messages("b")) == (404, []), body


def test_the_stream_cap_holds_for_streams_longer_than_two_leases(start_service, llm):
    """MAX_STREAMS_PER_USER=1: a second stream is refused however long the first has been open."""
    service = start_service(MAX_STREAMS_PER_USER=1, LEASE_SECONDS=1)
    with slow_stream(service, llm, "a"):
        time.sleep(3)  # past 2 × LEASE_SECONDS, the sorted set's own expiry
        second = service.stream("second stream", "b")
        status = second.status_code
        second.close()
        llm.release()
    lost = [line for line in service.output().splitlines() if "lost its lease" in line]
    assert (status, lost[:1]) == (429, []), "a second stream was let in once the slots' key expired"


@pytest.mark.parametrize("lease", [1, pytest.param(5, id="control-lease-longer-than-turn")])
def test_a_reader_on_another_instance_keeps_the_turn_alive_past_two_leases(start_service, llm, lease):
    """The asking client leaves; a reader resumes on instance two; the turn runs to its end, complete."""
    settings = {"STREAM_RESUME_GRACE_SECONDS": 1, "LEASE_SECONDS": lease}
    first, second = start_service(**settings), start_service(**settings)
    words = [f"w{n} " for n in range(40)]
    llm.script(Script(chunks=words, chunk_delay=0.15))  # about 6 s
    with first.stream("tell me", "c1") as response:
        got = read_events(response, stop_after=2)
    with resume(second, "c1", got[-1][0]) as rest:
        assert rest.status_code == 200
        got += read_events(rest)
    final = got[-1][1]
    assert final["finish_reason"] == "stop", final
    assert wait_until(lambda: len(stored_messages("c1")) == 2)
    assert stored_messages("c1")[1][2] == "complete"


def test_stop_while_redis_is_down_is_not_a_500(start_service, llm):
    """Redis down: a stream still runs (held in the process); /chat/stop stops it, as every endpoint keeps working."""
    private = RedisServer().start()
    try:
        service = start_service(REDIS_URL=private.url)
        private.stop()
        llm.script(Script(chunks=["partial ", "rest of it"], chunk_delay=30))
        with service.stream("hello", "c1") as response:
            assert response.status_code == 200
            received = events_with_ids(response)
            next(p for _, p in received if p != PING)
            stop = service.post("/chat/stop", {"conversation_id": "c1"})
            assert stop.status_code == 202, (stop.status_code, stop.text)
    finally:
        llm.release()
        private.close()


def worker_pid(service):
    """The pid of the service's one gunicorn worker."""
    workers = descendants(service.process.pid)
    assert len(workers) == 1, workers
    return workers[0]


@contextlib.contextmanager
def stalled(service, redis_client, conversation_id):
    """The service's worker frozen (SIGSTOP) until its turn's lease on the conversation has expired; woken after."""
    pid = worker_pid(service)
    os.kill(pid, signal.SIGSTOP)
    try:
        assert wait_until(lambda: redis_client.get(lease_key(conversation_id)) is None, timeout=30)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_stalled_process_journals_nothing_once_another_saved_its_turn(start_service, llm, redis_client):
    """Instance one stalls past its lease mid-stream; instance two saves its turn (ending its journal) and runs
    another; instance one wakes with chunks to journal: none is written, and the next turn is journaled as ever."""
    first, second = start_service(LEASE_SECONDS=1.5), start_service(LEASE_SECONDS=1.5)
    llm.script(Script(chunks=[f"w{n} " for n in range(60)], chunk_delay=0.1))  # chunks come in while it stalls
    with first.stream("stalled turn", "c1") as response:
        received = events_with_ids(response)
        stalled_turn = take_events(received, stop_after=1)[0][0].split(":")[0]
        assert wait_until(lambda: ("events", stalled_turn) in journal_entries(redis_client, "c1"))
        with stalled(first, redis_client, "c1"):
            assert second.run("next", "c1").status_code == 200
        after_recovery = journal_entries(redis_client, "c1")
        final = take_events(received)[-1][1]
    assert final.get("error", {}).get("code") == "turn_taken_over", final
    assert journal_entries(redis_client, "c1") == after_recovery
    llm.script(Script(chunks=["a fresh ", "turn"]))
    with second.stream("again", "c1") as response:
        latest = read_events(response)
    with resume(first, "c1") as replay:
        assert read_events(replay) == latest


def test_a_journal_lost_mid_turn_is_written_again_with_an_expiry(service, llm, redis_client):
    """The journal's key goes (evicted, say) while a turn streams: the batch that writes it again gives it an expiry."""
    key = journal.KEY.format(scope("alice", "c1"))
    llm.script(Script(chunks=[f"w{n} " for n in range(40)], chunk_delay=0.1))
    with service.stream("tell me", "c1") as response:
        received = events_with_ids(response)
        take_events(received, stop_after=1)
        assert wait_until(lambda: redis_client.exists(key))
        redis_client.delete(key)
        assert wait_until(lambda: redis_client.exists(key))
        expiry = redis_client.pttl(key)
        take_events(received)
    assert expiry > 0


def test_a_redis_that_forgot_the_journals_script_mid_turn_is_sent_it_again_and_misses_no_batch(start_service, llm):
    """Redis forgets its scripts (a restart, SCRIPT FLUSH) while a turn streams: the writer sends the script again
    within the turn, and the turn replays whole."""
    private = RedisServer().start()
    try:
        service = start_service(REDIS_URL=private.url, STREAM_RESUME_GRACE_SECONDS=20)
        sha = hashlib.sha1(journal._ADD_EVENTS.encode()).hexdigest()
        llm.script(Script(chunks=[f"w{n} " for n in range(40)], chunk_delay=0.1))
        with private.client() as client, service.stream("tell me", "c1") as response:
            received = events_with_ids(response)
            got = take_events(received, stop_after=1)
            assert wait_until(lambda: client.script_exists(sha)[0])
            client.script_flush()
            assert wait_until(lambda: client.script_exists(sha)[0])
            got += take_events(received)
        with resume(service, "c1") as replay:
            assert read_events(replay) == got
    finally:
        private.close()


def test_a_turn_whose_process_stalled_past_its_lease_is_saved_once(start_service, llm, redis_client):
    """Instance one stalls (SIGSTOP) past LEASE_SECONDS mid-turn; instance two recovers the turn and goes on;
    when instance one wakes and finishes the turn, its client is told, and nothing is saved a second time."""
    first, second = start_service(LEASE_SECONDS=1.5), start_service(LEASE_SECONDS=1.5)
    with slow_stream(first, llm, "c1", message="stalled turn") as received:
        assert wait_until(lambda: ("events", journal_entries(redis_client, "c1")[0][1])
                          in journal_entries(redis_client, "c1"))
        with stalled(first, redis_client, "c1"):
            taken_over = second.run("next", "c1")
        llm.release()
        final = rest_of(received)[-1]  # the final event comes once the turn's saving is over
    assert taken_over.status_code == 200, taken_over.text
    assert final["error"]["code"] == "turn_taken_over", final
    assert stored_messages("c1") == [("user", "stalled turn", "complete"), ("assistant", "partial ", "interrupted"),
                                     *complete(("next", "echo: next"))]


def test_a_refused_turn_leaves_the_last_turn_replayable(service, llm):
    """A turn the model refuses (502) keeps nothing, and takes nothing away: the last turn still replays."""
    llm.script(Script(chunks=["first ", "reply"]))
    with service.stream("one", "c1") as response:
        first = read_events(response)
    llm.script(Script(status=500))
    assert service.stream("two", "c1").status_code == 502
    with resume(service, "c1") as again:
        assert again.status_code == 200, "the last turn's replay was wiped by a refused turn"
        assert read_events(again) == first


@pytest.mark.parametrize("refusal, settings", [
    ("llm_error", {}), ("budget_exceeded", {"TOKEN_BUDGET_PER_DAY": 1}),
    ("too_many_streams", {"MAX_STREAMS_PER_USER": 1})])
def test_a_refused_turn_leaves_the_last_turn_kept_only_as_long_as_any_ended_one(start_service, llm, redis_client,
                                                                               refusal, settings):
    """After a refused turn the journal expires STREAM_RETAIN_SECONDS after it, as after the turn it leaves last,
    not in the days an unfinished turn is kept for."""
    service = start_service(STREAM_RETAIN_SECONDS=300, **settings)
    key = journal.KEY.format(scope("alice", "c1"))
    llm.script(Script(chunks=["first ", "reply"]))
    with service.stream("one", "c1") as response:
        read_events(response)
    if refusal == "too_many_streams":
        with slow_stream(service, llm, "other"):
            refused = service.stream("two", "c1")
            llm.release()
    else:
        llm.script(Script(status=500))
        refused = service.stream("two", "c1")
    assert refused.json()["error"]["code"] == refusal
    assert 0 < redis_client.pttl(key) <= 300 * 1000


def test_prune_skips_a_conversation_a_turn_holds_and_deletes_it_once_free(start_service, llm, redis_client):
    """A conversation busy with a turn is left to the next prune (nothing deleted comes back); once free it goes."""
    service = start_service()
    assert service.run("first", "c1").status_code == 200
    link = RedisLink(REDIS_URL)
    history = History(RedisCache(link, 3600), RedisCoordination(link), link.round_trip, RedisJournal(link, 300))
    with slow_stream(service, llm, "c1", message="second") as received:
        assert history.prune(datetime.timedelta(0)) == 0
        llm.release()
        rest_of(received)
    assert [m[1] for m in stored_messages("c1")] == ["first", "echo: first", "second", "partial rest of it"]
    assert history.prune(datetime.timedelta(0)) == 1
    assert service.run("third", "c1").status_code == 200
    assert seen_by_model(llm) == ["third"]


def test_unknown_methods_do_not_grow_the_metrics_without_bound(service):
    """Each made-up HTTP method is a 405; none becomes a label of its own."""
    for n in range(30):
        requests.request(f"X{n:03d}", service.url + "/status", headers={"Connection": "close"}, timeout=5)
    body = requests.get(service.url + "/metrics", timeout=5).text
    series = [line for line in body.splitlines() if line.startswith("chat_requests_total{")]
    assert len(series) < 10, f"{len(series)} series, e.g. {series[:3]}"


def test_resume_on_another_instance_survives_a_model_pause_of_a_second(start_service, llm):
    """The model pauses 1.5 s between chunks; a reader resumed on instance two gets the whole reply, not an error."""
    first, second = start_service(STREAM_RESUME_GRACE_SECONDS=20), start_service(STREAM_RESUME_GRACE_SECONDS=20)
    llm.script(Script(chunks=["one ", "two ", "three"], chunk_delay=1.5))
    with first.stream("tell me", "c1") as response:
        got = read_events(response, stop_after=1)
    with resume(second, "c1", got[-1][0]) as rest:
        assert rest.status_code == 200
        got += read_events(rest)
    final = got[-1][1]
    assert "error" not in final, (final, [line for line in second.output().splitlines() if "warning" in line])
    assert "".join(p["content"] for _, p in got) == "one two three"


def test_stop_while_the_model_has_not_answered_yet_stops_the_stream(service, llm, redis_client):
    """/chat/stop answered 202 while the model was still to send its headers: the stream ends stopped."""
    import threading


    llm.script(Script(chunks=["one ", "two ", "three"], header_delay=1.5, chunk_delay=0.5))
    result = {}

    def asking():
        with service.stream("tell me", "c1") as response:
            result["events"] = read_events(response)

    asker = threading.Thread(target=asking)
    asker.start()
    assert wait_until(lambda: (redis_client.get(lease_key("c1")) or "").endswith(" stream"))
    stop = service.post("/chat/stop", {"conversation_id": "c1"})
    asker.join(20)
    assert stop.status_code == 202
    final = result["events"][-1][1]
    assert final["finish_reason"] == "stopped", final


def test_sigterm_ends_a_resumed_stream_of_another_instance_with_a_final_event(start_service, llm):
    """Instance two, following instance one's turn from the journal, gets SIGTERM: its reader still gets a final event."""
    first = start_service(STREAM_RESUME_GRACE_SECONDS=20)
    second = start_service(STREAM_RESUME_GRACE_SECONDS=20, GRACEFUL_TIMEOUT=5)
    llm.script(Script(chunks=[f"w{n} " for n in range(200)], chunk_delay=0.1))  # 20 s
    with first.stream("tell me", "c1") as response:
        got = read_events(response, stop_after=1)
    with resume(second, "c1", got[-1][0]) as rest:
        assert rest.status_code == 200
        second.process.send_signal(signal.SIGTERM)
        try:
            got += read_events(rest)
        except requests.RequestException as exc:
            got.append((None, {"cut": type(exc).__name__}))
    llm.release()
    assert got[-1][1].get("is_final"), got[-1]


def opens_a_stream(service, conversation_id):
    """Whether the user can open a stream now (it is closed at once)."""
    attempt = service.stream("again", conversation_id)
    attempt.close()
    return attempt.status_code == 200


def test_head_requests_of_a_resume_do_not_use_up_the_stream_slots(start_service, llm):
    """HEAD /chat/stream/{id} (Flask answers HEAD for every GET route) must not hold a stream slot for ever:
    after two of them, with two streams allowed, the user opens a stream well within a lease."""
    service = start_service(MAX_STREAMS_PER_USER=2)
    llm.script(Script(chunks=["a ", "b"]))
    with service.stream("one", "c1") as response:
        read_events(response)
    heads = [service.request("HEAD", "/chat/stream/c1").status_code for _ in range(2)]
    assert heads == [200, 200]
    assert wait_until(lambda: opens_a_stream(service, "c2"), timeout=5, interval=0.2), \
        "HEAD requests used up the user's stream slots"


def test_a_user_who_keeps_trying_after_a_head_request_gets_a_stream_within_a_few_leases(start_service, llm):
    """The slot a HEAD request took is let go, never renewed by the keeper: with one stream allowed and leases
    of 1 s, a user who keeps trying opens a stream within a few leases, not 429 for as long as they try."""
    service = start_service(MAX_STREAMS_PER_USER=1, LEASE_SECONDS=1)
    llm.script(Script(chunks=["a ", "b"]))
    with service.stream("one", "c1") as response:
        read_events(response)
    assert service.request("HEAD", "/chat/stream/c1").status_code == 200
    assert wait_until(lambda: opens_a_stream(service, "c2"), timeout=8, interval=0.5)
