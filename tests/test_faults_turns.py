"""Turns racing on one conversation, over the real gunicorn + gevent service.

While a turn runs, any other turn of the same conversation is refused with 409
`conversation_busy`: in one worker, across worker processes and across services
(a lock in Redis with an expiry), and on the embedded defaults (a lock in the process).
Nothing interleaves and nothing is lost; other conversations are never held up.
"""

import threading

import pytest

import models
from tests.fake_llm import Script
from tests.helpers import (ACCESS_LOG_WITH_PID, Holder, assert_error, busy_answers_by_worker, complete, lease_key,
                           seen_by_model, stored_messages, wait_until)

# Each scenario holds a conversation in one process while turns from others race for it: seconds each.
pytestmark = pytest.mark.slow

def refused_while_held(llm, holding, contending, paths, conversation_id="c1"):
    """Hold the conversation with a stream on `holding`; each path's turn on `contending` is a 409; then let go."""
    holder = Holder(holding, llm, "stream", conversation_id)
    for path in paths:
        assert_error(contending.turn(path, "second", conversation_id), 409, "conversation_busy")
    llm.release()
    assert holder.finish() == "held reply"


@pytest.mark.parametrize("holder_path,contender_path", [
    ("stream", "stream"), ("stream", "run"), ("run", "stream"), ("run", "run"),
])
def test_second_turn_on_a_busy_conversation_is_409(start_service, llm, redis_client,
                                                   holder_path, contender_path):
    """While one turn runs, another on the same conversation gets 409; afterwards turns work and nothing interleaves."""
    service = start_service()
    holder = Holder(service, llm, holder_path, "c1")
    ttl = redis_client.pttl(lease_key("c1"))
    assert 0 < ttl <= 10 * 1000  # LEASE_SECONDS, renewed while the turn lives
    calls = len(llm.requests)
    assert_error(service.turn(contender_path, "second", "c1"), 409, "conversation_busy")
    assert len(llm.requests) == calls  # the refused turn never reached the model
    llm.release()
    assert holder.finish() == "held reply"
    assert wait_until(lambda: redis_client.get(lease_key("c1")) is None, timeout=5)
    llm.script(Script(reply="third reply"))
    response = service.turn(contender_path, "third", "c1")
    assert response.status_code == 200
    assert seen_by_model(llm) == [
        "first", "held reply", "third"]
    assert stored_messages("c1") == complete(("first", "held reply"), ("third", "third reply"))


def test_busy_conversation_is_409_in_every_worker_process(start_service, llm):
    """With two workers, concurrent attempts land in both processes and every one of them is refused."""
    service = start_service(workers=2, GUNICORN_CMD_ARGS=ACCESS_LOG_WITH_PID)
    holder = Holder(service, llm, "stream", "c1")
    calls = len(llm.requests)
    answered = []

    def contend(n):
        """One attempt on the held conversation."""
        answered.append(service.turn(("run", "stream")[n % 2], f"attempt {n}", "c1"))

    def both_workers_refused():
        """Send ten attempts at once; true once refusals came from two worker processes."""
        threads = [threading.Thread(target=contend, args=(n,)) for n in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        refusing = [pid for pid, statuses in busy_answers_by_worker(service).items() if 409 in statuses]
        return len(refusing) >= 2

    assert wait_until(both_workers_refused, timeout=30, interval=0)
    assert answered and all(r.status_code == 409 for r in answered), [r.status_code for r in answered]
    for response in answered:
        assert_error(response, 409, "conversation_busy")
    assert len(llm.requests) == calls
    llm.release()
    assert holder.finish() == "held reply"
    llm.script(Script(reply="later reply"))
    assert service.run("later", "c1").status_code == 200
    assert stored_messages("c1") == complete(("first", "held reply"), ("later", "later reply"))


def test_busy_conversation_is_409_from_another_service_sharing_redis(start_service, llm):
    """Two services sharing Redis: a turn held in one refuses the other's; then the other carries on."""
    first = start_service()
    second = start_service()
    refused_while_held(llm, first, second, ("run", "stream"))
    llm.script(Script(reply="second service reply"))
    assert second.run("next", "c1").status_code == 200
    assert seen_by_model(llm) == ["first", "held reply", "next"]
    assert stored_messages("c1") == complete(("first", "held reply"), ("next", "second service reply"))


def test_busy_conversation_is_409_on_the_embedded_defaults(start_service, llm, postgres, tmp_path):
    """Without Redis (a SQLite file, the in-process cache and locks) a second concurrent turn is refused too."""
    url = f"sqlite:///{tmp_path / 'x.db'}"
    sqlite = models.open_database(url, 1, 5)
    with models.db.connection_context():
        models.create_tables()
    models.db.initialize(postgres)
    try:
        service = start_service(REDIS_URL="", DATABASE_URL=url)
        refused_while_held(llm, service, service, ("stream", "run"))
        llm.script(Script(reply="third reply"))
        assert service.run("third", "c1").status_code == 200
        models.db.initialize(sqlite)
        assert stored_messages("c1") == complete(("first", "held reply"), ("third", "third reply"))
    finally:
        sqlite.close_all()
        models.db.initialize(postgres)
    assert stored_messages("c1") == []  # the service kept nothing in PostgreSQL


def test_lock_of_a_crashed_holder_expires(start_service, llm, redis_client):
    """A lock left by a holder that died (no release) refuses turns only until it expires."""
    service = start_service()
    redis_client.set(lease_key("c9"), "x", px=500)
    assert_error(service.run("too soon", "c9"), 409, "conversation_busy")
    assert_error(service.turn("stream", "too soon", "c9"), 409, "conversation_busy")
    answers = []

    def accepted():
        """Try a turn; true once it is answered."""
        answers.append(service.run("hello again", "c9"))
        return answers[-1].status_code == 200

    assert wait_until(accepted, timeout=5, interval=0.05)
    assert all(r.status_code == 409 for r in answers[:-1])
    assert len(llm.requests) == 1  # only the accepted turn reached the model
    assert stored_messages("c9") == complete(("hello again", "echo: hello again"))
    assert redis_client.get(lease_key("c9")) is None


def test_different_conversations_never_block_each_other(start_service, llm):
    """Five conversations held at once, and others still answered at once, on one worker."""
    service = start_service(workers=1)
    holders = [Holder(service, llm, ("stream", "run")[n % 2], f"held-{n}") for n in range(5)]
    assert llm.active_streams == 3
    for n, path in enumerate(("run", "stream", "run")):
        response = service.turn(path, "hi", f"free-{n}")
        assert response.status_code == 200, response.text
    assert stored_messages("free-0") == complete(("hi", "echo: hi"))
    llm.release()
    assert all(holder.finish() == "held reply" for holder in holders)
    for n in range(5):
        assert [status for _, _, status in stored_messages(f"held-{n}")] == ["complete", "complete"]
