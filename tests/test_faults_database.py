"""PostgreSQL faults: the service under gunicorn answers 503 while the database is gone and recovers by itself.

The service reaches PostgreSQL through a TcpProxy this test owns (tests/faults.py), which
refuses and cuts connections; the machine's PostgreSQL itself is never touched.
"""

import threading
import uuid

import pytest
import requests

from tests.fake_llm import Script
from tests.helpers import (
    through,
    cache_key,
    cached_contents,
    cached_messages,
    complete,
    conversation_exists,
    lock_waiters,
    locked_table,
    seen_by_model,
    stored_messages,
    wait_until,
)
from tests.sse_client import data_events, events, rest_of

# Each scenario breaks something on purpose and waits for the service to notice: seconds each.
pytestmark = pytest.mark.slow

DATABASE_UNAVAILABLE = {"error": {"code": "database_unavailable", "message": "the database is unavailable"}}


def fill_pool(service, postgres_url, size):
    """Make the service's pool open `size` connections at once: as many new conversations wait on a locked table."""
    answers = []
    with locked_table(postgres_url, "chat_conversation"):
        turns = [threading.Thread(target=lambda: answers.append(service.run("fill", f"fill-{uuid.uuid4()}")))
                 for _ in range(size)]
        for turn in turns:
            turn.start()
        assert wait_until(lambda: lock_waiters(postgres_url) == size, timeout=10)
    for turn in turns:
        turn.join(20)
    assert [answer.status_code for answer in answers] == [200] * size


def assert_turn_2_left_no_trace(service, llm, redis_client, conversation_id):
    """Of the failed turn 2 neither message was kept, the cache still matches the database, and turn 3 follows turn 1."""
    assert stored_messages(conversation_id) == complete(("turn 1", "echo: turn 1"))
    assert cached_contents(redis_client, conversation_id) == ["turn 1", "echo: turn 1"]
    response = service.run("turn 3", conversation_id)
    assert response.status_code == 200
    assert seen_by_model(llm) == ["turn 1", "echo: turn 1", "turn 3"]
    assert stored_messages(conversation_id) == complete(("turn 1", "echo: turn 1"), ("turn 3", "echo: turn 3"))


def test_database_refusing_connections_is_503_and_the_service_recovers_by_itself(start_service, llm, pg_proxy,
                                                                                  redis_client):
    """While PostgreSQL refuses connections turns are JSON 503s and nothing is half-written; then all works again."""
    service = start_service(DATABASE_URL=through(pg_proxy), DATABASE_POOL_SIZE=2)
    assert service.run("one", "c1").status_code == 200
    pg_proxy.refuse()
    pg_proxy.cut()

    # A cached conversation: whether or not the model answered, the turn cannot be kept.
    response = service.run("lost", "c1")
    assert response.status_code == 503
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == DATABASE_UNAVAILABLE
    # Conversations not cached: their history cannot be read, so the model is not asked.
    calls = len(llm.requests)
    response = service.run("hi", "c2")
    assert response.status_code == 503 and response.json() == DATABASE_UNAVAILABLE
    opened = service.stream("hi", "c3")
    assert opened.status_code == 503
    assert opened.headers["Content-Type"] == "application/json"
    assert opened.json() == DATABASE_UNAVAILABLE
    assert len(llm.requests) == calls

    about = service.status_once(lambda about: about["status"] == "degraded")
    assert about["status"] == "degraded"
    assert about["database"] == {"state": "unavailable", "backend": "postgresql", "reason": (
        "connection refused: nothing listens at the host and port of DATABASE_URL (is PostgreSQL running?)")}
    assert about["cache"]["state"] == "ok"

    pg_proxy.accept()
    response = service.run("two", "c1")
    assert response.status_code == 200
    assert response.json() == {"response": "echo: two", "conversation_id": "c1"}
    assert seen_by_model(llm) == ["one", "echo: one", "two"]
    assert stored_messages("c1") == complete(("one", "echo: one"), ("two", "echo: two"))
    assert cached_contents(redis_client, "c1") == ["one", "echo: one", "two", "echo: two"]
    assert not conversation_exists("c2") and not conversation_exists("c3")
    assert cached_messages(redis_client, "c2") is None and cached_messages(redis_client, "c3") is None
    assert service.status_once(lambda about: about["status"] == "ok")["status"] == "ok"

    final = data_events(service.stream("hi again", "c3"))[-1]
    assert final["is_final"] is True and "error" not in final
    assert stored_messages("c3") == complete(("hi again", "echo: hi again"))


def test_a_database_outage_is_logged_once_with_its_reason_and_once_when_it_ends(start_service, llm, pg_proxy,
                                                                               redis_client):
    """However many requests meet a database refusing connections, the log says why once, and once that it is back."""
    service = start_service(DATABASE_URL=through(pg_proxy))
    assert service.run("one", "c1").status_code == 200
    pg_proxy.refuse()
    pg_proxy.cut()
    for n in range(4):
        assert service.run(f"turn {n}", f"new-{n}").status_code == 503
    refused = "connection refused: nothing listens at the host and port of DATABASE_URL (is PostgreSQL running?)"
    assert service.messages("The database cannot be used") == [f"The database cannot be used: {refused}"]
    assert service.status_once(lambda about: about["database"]["state"] == "unavailable")["database"]["reason"] \
        == refused

    pg_proxy.accept()
    assert service.run("two", "c1").status_code == 200
    assert service.messages("The database is reachable again") == ["The database is reachable again"]
    assert len(service.messages("The database cannot be used")) == 1


def test_connections_dropped_while_pooled_are_replaced(start_service, llm, pg_proxy, postgres_url, redis_client):
    """When every pooled connection is cut while idle, the next turns get fresh connections and succeed."""
    service = start_service(DATABASE_URL=through(pg_proxy), DATABASE_POOL_SIZE=2)
    fill_pool(service, postgres_url, 2)
    assert pg_proxy.open_connections == 2
    accepted = pg_proxy.connections_accepted

    pg_proxy.cut()
    assert pg_proxy.open_connections == 0
    response = service.run("after the cut", "c1")
    assert response.status_code == 200, response.text
    assert pg_proxy.connections_accepted > accepted
    assert stored_messages("c1") == complete(("after the cut", "echo: after the cut"))
    assert cached_contents(redis_client, "c1") == ["after the cut", "echo: after the cut"]

    pg_proxy.cut()
    assert service.status()["database"]["state"] == "ok"
    redis_client.delete(cache_key("c1"))
    final = data_events(service.stream("and again", "c1"))[-1]
    assert final["is_final"] is True and "error" not in final
    assert seen_by_model(llm) == ["after the cut", "echo: after the cut", "and again"]
    assert stored_messages("c1") == complete(("after the cut", "echo: after the cut"),
                                             ("and again", "echo: and again"))


def test_database_failing_at_the_end_of_a_stream_is_in_the_final_event(start_service, llm, pg_proxy,
                                                                       redis_client):
    """If PostgreSQL goes while the model streams, the final event says database_unavailable; nothing is half-kept."""
    service = start_service(DATABASE_URL=through(pg_proxy), LLM_TIMEOUT_SECONDS=20)
    assert service.run("turn 1", "s1").status_code == 200

    llm.script(Script(chunks=["a", "b"], chunk_delay=30))
    opened = service.stream("turn 2", "s1")
    assert opened.status_code == 200
    received = events(opened)
    assert next(received)["content"] == "a"
    pg_proxy.refuse()
    pg_proxy.cut()
    llm.release()
    rest = rest_of(received)
    assert [event["content"] for event in rest] == ["b", ""]
    final = rest[-1]
    assert final["is_final"] is True and final["conversation_id"] == "s1"
    assert final["error"] == DATABASE_UNAVAILABLE["error"]

    pg_proxy.accept()
    assert_turn_2_left_no_trace(service, llm, redis_client, "s1")


def test_no_broken_connection_is_left_in_the_pool(start_service, llm, pg_proxy, postgres_url):
    """After an outage that broke every pooled connection, twenty turns in a row all succeed on a pool of two."""
    service = start_service(DATABASE_URL=through(pg_proxy), DATABASE_POOL_SIZE=2)
    fill_pool(service, postgres_url, 2)
    pg_proxy.refuse()
    pg_proxy.cut()
    assert service.run("down", "n1").status_code == 503
    assert service.status_once(lambda about: about["database"]["state"] == "unavailable")["database"]["state"] \
        == "unavailable"
    pg_proxy.accept()

    for n in range(20):
        if n % 2:
            opened = service.stream(f"turn {n}", "n1")
            assert opened.status_code == 200, (n, opened.text)
            final = data_events(opened)[-1]
            assert final["is_final"] is True and "error" not in final, (n, final)
        else:
            response = service.run(f"turn {n}", "n1")
            assert response.status_code == 200, (n, response.text)
    assert stored_messages("n1") == complete(*[(f"turn {n}", f"echo: turn {n}") for n in range(20)])
    assert pg_proxy.open_connections <= 2
    fill_pool(service, postgres_url, 2)
    assert service.status_once(lambda about: about["status"] == "ok")["status"] == "ok"


def test_connection_cut_while_saving_a_turn_keeps_neither_message(start_service, llm, pg_proxy, postgres_url,
                                                                  redis_client):
    """A connection cut in the middle of the turn's transaction is a 503 that leaves the conversation as it was."""
    service = start_service(DATABASE_URL=through(pg_proxy))
    assert service.run("turn 1", "t1").status_code == 200
    answers = []
    with locked_table(postgres_url, "chat_message"):
        saving = threading.Thread(target=lambda: answers.append(service.run("turn 2", "t1")))
        saving.start()
        # The history came from the cache; the transaction is open and waits to insert the messages.
        assert wait_until(lambda: lock_waiters(postgres_url) == 1, timeout=10)
        pg_proxy.cut()
        saving.join(20)
    assert answers[0].status_code == 503, answers[0].text
    assert answers[0].json() == DATABASE_UNAVAILABLE
    assert wait_until(lambda: lock_waiters(postgres_url) == 0, timeout=10)
    assert_turn_2_left_no_trace(service, llm, redis_client, "t1")


def answered(call, *args, **kwargs):
    """The response of `call`, failing the test if the service does not answer at all within the client's timeout."""
    try:
        return call(*args, **kwargs)
    except requests.Timeout:
        pass
    pytest.fail(f"no answer within {kwargs.get('timeout')} s: the request hangs on the silent database")


def test_database_that_stops_answering_is_503_not_a_hang(start_service, llm, pg_proxy, redis_client):
    """A PostgreSQL that accepts connections but never answers (a partition) costs turns a 503, not an endless wait."""
    # Each wait on the database is bounded; a checkout may try every pooled connection once.
    service = start_service(DATABASE_URL=through(pg_proxy), DATABASE_POOL_SIZE=2, DATABASE_POOL_TIMEOUT=2,
                            DATABASE_TIMEOUT_SECONDS=1)
    assert service.run("one", "c1").status_code == 200

    pg_proxy.stall()
    response = answered(service.run, "hi", "c2", timeout=10)
    assert response.status_code == 503 and response.json() == DATABASE_UNAVAILABLE
    about = answered(requests.get, service.url + "/status", timeout=10)
    assert about.status_code == 200 and about.json()["database"]["state"] == "unavailable"

    pg_proxy.flow()
    pg_proxy.cut()
    assert service.run("two", "c1").status_code == 200
    assert seen_by_model(llm) == ["one", "echo: one", "two"]
    assert stored_messages("c1") == complete(("one", "echo: one"), ("two", "echo: two"))
    assert not conversation_exists("c2")
