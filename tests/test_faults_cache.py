"""Redis faults: the service under gunicorn keeps answering from PostgreSQL when its cache stops, hangs or forgets.

Each test points the service at a private redis-server it owns (tests/faults.py) and breaks
that one; the machine's shared Redis is never touched.
"""

import pytest

from coordination import WHILE_REDIS_IS_DOWN
from tests.fake_llm import Script
from tests.helpers import (
    cached_contents,
    cached_messages,
    complete,
    contents,
    seen_by_model,
    stored_conversation,
    stored_messages,
    wait_until,
)
from tests.sse_client import data_events, events, rest_of

# Each scenario breaks something on purpose and waits for the service to notice: seconds each.
pytestmark = pytest.mark.slow


@pytest.fixture
def redis_probe(private_redis):
    """A client of the private Redis, for looking at what the service cached."""
    client = private_redis.client()
    yield client
    client.close()


def cache_is(service, state):
    """True once /status reports the cache in `state`."""
    return service.status()["cache"]["state"] == state


def test_redis_stopped_turns_read_the_database_and_the_cache_comes_back(start_service, llm, private_redis,
                                                                       redis_probe):
    """With Redis stopped, run and stream still answer from the database's history; restarted, Redis is used again."""
    service = start_service(REDIS_URL=private_redis.url)
    assert service.run("I am Bo.", "c1").status_code == 200
    assert cached_contents(redis_probe, "c1") == ["I am Bo.", "echo: I am Bo."]

    private_redis.stop()
    response = service.run("Who am I?", "c1")
    assert response.status_code == 200
    assert response.json() == {"response": "echo: Who am I?", "conversation_id": "c1"}
    assert seen_by_model(llm) == ["I am Bo.", "echo: I am Bo.", "Who am I?"]

    llm.script(Script(chunks=["Still ", "Bo."]))
    opened = service.stream("Sure?", "c1")
    assert opened.status_code == 200
    final = data_events(opened)[-1]
    assert final["is_final"] is True and "error" not in final
    assert seen_by_model(llm) == ["I am Bo.", "echo: I am Bo.", "Who am I?", "echo: Who am I?", "Sure?"]

    about = service.status_once(lambda about: about["status"] == "degraded")
    assert about["status"] == "degraded"
    assert about["cache"] == {"state": "unavailable", "backend": "redis", "turn_leases": "per_process",
                              "reason": "connection refused: nothing listens at the host and port of REDIS_URL"}
    assert about["database"]["state"] == "ok"
    assert stored_messages("c1") == complete(("I am Bo.", "echo: I am Bo."), ("Who am I?", "echo: Who am I?"),
                                             ("Sure?", "Still Bo."))

    private_redis.start()
    assert wait_until(lambda: cache_is(service, "ok"), timeout=10)
    assert service.status_once(lambda about: about["status"] == "ok")["status"] == "ok"
    assert cached_messages(redis_probe, "c1") is None
    assert service.run("And now?", "c1").status_code == 200
    assert seen_by_model(llm) == ["I am Bo.", "echo: I am Bo.", "Who am I?", "echo: Who am I?",
                                  "Sure?", "Still Bo.", "And now?"]
    version, cached = cached_messages(redis_probe, "c1")
    assert version == stored_conversation("c1").version
    assert contents(cached) == ["I am Bo.", "echo: I am Bo.", "Who am I?", "echo: Who am I?",
                                "Sure?", "Still Bo.", "And now?", "echo: And now?"]
    assert len(stored_messages("c1")) == 8


def test_a_redis_outage_is_logged_once_with_its_reason_and_once_when_it_ends(start_service, private_redis):
    """However many turns meet a stopped Redis, the log says once why it cannot be used, and once that it is back."""
    service = start_service(REDIS_URL=private_redis.url)
    assert service.run("one", "c1").status_code == 200
    private_redis.stop()
    for n in range(4):
        assert service.run(f"turn {n}", "c1").status_code == 200
    assert wait_until(lambda: cache_is(service, "unavailable"), timeout=10)
    assert service.run("after a second", "c1").status_code == 200  # past the fail-fast second: Redis is tried again
    said = service.messages("Redis cannot be used")
    assert said == [f"Redis cannot be used: connection refused: nothing listens at the host and port of REDIS_URL. "
                    f"{WHILE_REDIS_IS_DOWN}"]
    assert service.messages("Redis is reachable again") == []

    private_redis.start()
    assert wait_until(lambda: cache_is(service, "ok"), timeout=10)
    assert service.run("two", "c1").status_code == 200
    assert service.messages("Redis is reachable again") == ["Redis is reachable again"]
    assert service.messages("Redis cannot be used") == said


def test_redis_paused_turns_still_answer_and_the_cache_comes_back(start_service, llm, private_redis, redis_probe):
    """A Redis that accepts connections but never answers costs a turn its short timeouts, not its answer."""
    service = start_service(REDIS_URL=private_redis.url)
    assert service.run("one", "c1").status_code == 200

    private_redis.pause()
    response = service.run("two", "c1")
    assert response.status_code == 200
    assert response.json()["response"] == "echo: two"
    assert seen_by_model(llm) == ["one", "echo: one", "two"]
    about = service.status_once(lambda about: about["status"] == "degraded")
    assert about["status"] == "degraded" and about["cache"]["state"] == "unavailable"
    assert about["database"]["state"] == "ok"
    assert stored_messages("c1") == complete(("one", "echo: one"), ("two", "echo: two"))

    private_redis.resume()
    assert wait_until(lambda: cache_is(service, "ok"), timeout=10)
    # Redis is used again: a new conversation is cached.
    assert service.run("fresh", "c2").status_code == 200
    assert cached_contents(redis_probe, "c2") == ["fresh", "echo: fresh"]
    # And the conversation whose turn was taken while Redis hung goes on.
    response = service.run("three", "c1")
    assert response.status_code == 200, response.text
    assert seen_by_model(llm) == ["one", "echo: one", "two", "echo: two", "three"]
    assert cached_contents(redis_probe, "c1") == ["one", "echo: one", "two", "echo: two",
                                                               "three", "echo: three"]


def test_a_stale_cache_entry_never_wins_over_the_database(start_service, llm, private_redis, redis_probe):
    """A turn whose cache write failed leaves Redis holding an old copy; later turns read the database's history."""
    service = start_service(REDIS_URL=private_redis.url)
    assert service.run("turn 1", "c1").status_code == 200
    assert cached_contents(redis_probe, "c1") == ["turn 1", "echo: turn 1"]

    private_redis.pause()
    assert service.run("turn 2", "c1").status_code == 200
    assert stored_messages("c1") == complete(("turn 1", "echo: turn 1"), ("turn 2", "echo: turn 2"))
    private_redis.resume()
    # The premise: Redis kept its old entry, which misses turn 2.
    assert cached_contents(redis_probe, "c1") == ["turn 1", "echo: turn 1"]

    response = service.run("turn 3", "c1")
    assert response.status_code == 200, response.text
    assert seen_by_model(llm) == ["turn 1", "echo: turn 1", "turn 2", "echo: turn 2", "turn 3"]
    history = complete(("turn 1", "echo: turn 1"), ("turn 2", "echo: turn 2"), ("turn 3", "echo: turn 3"))
    assert stored_messages("c1") == history
    # Whatever copy Redis still holds, the next turn again sees the database's history.
    assert wait_until(lambda: cache_is(service, "ok"), timeout=10)

    llm.script(Script(chunks=["four"]))
    opened = service.stream("turn 4", "c1")
    assert opened.status_code == 200, opened.text
    final = data_events(opened)[-1]
    assert final["is_final"] is True and "error" not in final
    assert seen_by_model(llm) == ["turn 1", "echo: turn 1", "turn 2", "echo: turn 2", "turn 3", "echo: turn 3",
                                  "turn 4"]
    assert cached_contents(redis_probe, "c1") == ["turn 1", "echo: turn 1", "turn 2", "echo: turn 2",
                                                               "turn 3", "echo: turn 3", "turn 4", "four"]


def test_a_stale_cache_entry_never_wins_on_another_instance(start_service, llm, private_redis, redis_probe):
    """An old entry that Redis restores after an outage is not trusted by an instance that did not see the outage."""
    first = start_service(REDIS_URL=private_redis.url)
    second = start_service(REDIS_URL=private_redis.url)
    assert first.run("turn 1", "c1").status_code == 200
    redis_probe.save()
    private_redis.stop()

    assert first.run("turn 2", "c1").status_code == 200
    assert stored_messages("c1") == complete(("turn 1", "echo: turn 1"), ("turn 2", "echo: turn 2"))
    private_redis.start()
    # The premise: Redis came back from its snapshot with an entry that misses turn 2.
    assert cached_contents(redis_probe, "c1") == ["turn 1", "echo: turn 1"]

    response = second.run("turn 3", "c1")
    assert response.status_code == 200, response.text
    assert seen_by_model(llm) == ["turn 1", "echo: turn 1", "turn 2", "echo: turn 2", "turn 3"]
    history = ["turn 1", "echo: turn 1", "turn 2", "echo: turn 2", "turn 3", "echo: turn 3"]
    cached = cached_messages(redis_probe, "c1")
    assert cached is None or contents(cached[1]) == history
    assert first.run("turn 4", "c1").status_code == 200
    assert seen_by_model(llm) == history + ["turn 4"]


def test_redis_restarted_empty_mid_conversation_reloads_the_history(start_service, llm, private_redis,
                                                                    redis_probe):
    """After Redis restarts empty, the next turn sends the database's full history and caches it again."""
    service = start_service(REDIS_URL=private_redis.url)
    assert service.run("a", "c1").status_code == 200
    assert service.run("b", "c1").status_code == 200
    assert len(cached_messages(redis_probe, "c1")[1]) == 4

    private_redis.stop()
    private_redis.start()
    assert cached_messages(redis_probe, "c1") is None

    llm.script(Script(chunks=["C"]))
    opened = service.stream("c", "c1")
    assert opened.status_code == 200
    final = data_events(opened)[-1]
    assert final["is_final"] is True and "error" not in final
    assert seen_by_model(llm) == ["a", "echo: a", "b", "echo: b", "c"]
    assert stored_messages("c1") == complete(("a", "echo: a"), ("b", "echo: b"), ("c", "C"))
    assert cached_contents(redis_probe, "c1") == ["a", "echo: a", "b", "echo: b", "c", "C"]

    assert service.run("d", "c1").status_code == 200
    assert seen_by_model(llm) == ["a", "echo: a", "b", "echo: b", "c", "C", "d"]
    assert service.status_once(lambda about: about["status"] == "ok")["status"] == "ok"


def test_turn_lock_falls_back_to_the_process_when_redis_is_down(start_service, llm, private_redis):
    """With Redis stopped, two streams on one conversation in one worker still get one 200 and one 409."""
    service = start_service(workers=1, REDIS_URL=private_redis.url, LLM_TIMEOUT_SECONDS=20)
    assert service.run("hello", "c1").status_code == 200
    private_redis.stop()
    calls = len(llm.requests)

    llm.script(Script(chunks=["first ", "wins"], chunk_delay=30))
    first = service.stream("one", "c1")
    assert first.status_code == 200
    first_events = events(first)
    assert next(first_events)["content"] == "first "
    second = service.stream("two", "c1")
    assert second.status_code == 409
    assert second.headers["Content-Type"] == "application/json"
    assert second.json() == {"error": {"code": "conversation_busy",
                                       "message": "another turn of this conversation is in progress"}}
    assert service.run("three", "c1").status_code == 409
    assert len(llm.requests) == calls + 1

    llm.release()
    rest = rest_of(first_events)
    assert [event["content"] for event in rest] == ["wins", ""]
    assert rest[-1]["is_final"] is True and "error" not in rest[-1]
    assert stored_messages("c1") == complete(("hello", "echo: hello"), ("one", "first wins"))

    response = service.run("next", "c1")
    assert response.status_code == 200
    assert seen_by_model(llm) == ["hello", "echo: hello", "one", "first wins", "next"]
    assert stored_messages("c1") == complete(("hello", "echo: hello"), ("one", "first wins"), ("next", "echo: next"))
