"""SIGTERM to the gunicorn master while turns are in flight.

gunicorn stops accepting at once; a turn in flight may finish within GRACEFUL_TIMEOUT;
a stream still open GRACEFUL_TIMEOUT - 3 s (at least 0.5 s) after SIGTERM is ended by the
service with a final `shutting_down` event, its partial reply kept with status `error`.
"""

import signal
import socket
import subprocess
import threading
import time

import requests

import models
from tests.helpers import bearer, wait_until
from tests.fake_llm import Script
from tests.sse_client import PING, events


def stored(conversation_id):
    """The (role, content, status) of each stored message of a conversation, oldest first."""
    with models.db.connection_context():
        query = (models.Message.select().where(models.Message.conversation == conversation_id)
                 .order_by(models.Message.id))
        return [(m.role, m.content, m.status) for m in query]


def post(service, path, body, **kwargs):
    """POST as alice on a connection closed after the answer.

    An idle keep-alive connection would hold the worker until GRACEFUL_TIMEOUT: gunicorn's gevent
    worker waits for every open connection, idle ones included.
    """
    headers = {**bearer("alice"), "Connection": "close"}
    return requests.post(service.url + path, json=body, headers=headers, **kwargs)


def refuses_connections(service):
    """True if a new TCP connection to the service is refused."""
    try:
        socket.create_connection(("127.0.0.1", service.port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def exit_code(service, timeout):
    """The gunicorn master's exit status once it exited (None if it did not within `timeout`)."""
    try:
        return service.process.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def test_sigterm_lets_a_run_in_flight_finish_and_refuses_new_connections(start_service, llm):
    """A /chat/run waiting on the model when SIGTERM comes still answers 200 and is kept; new connections are refused."""
    service = start_service(GRACEFUL_TIMEOUT=10)
    llm.script(Script(reply="made it", header_delay=30))
    answers = []

    def ask():
        """The run in flight: its response, or the error that ended it."""
        try:
            answers.append(post(service, "/chat/run", {"message": "quick, before you go",
                                                       "conversation_id": "s1"}, timeout=30))
        except requests.RequestException as exc:
            answers.append(exc)

    in_flight = threading.Thread(target=ask)
    in_flight.start()
    assert llm.wait_for_requests(1)
    service.process.send_signal(signal.SIGTERM)
    assert wait_until(lambda: refuses_connections(service), timeout=5)
    assert answers == [], f"SIGTERM cut off the run in flight: {answers}"
    assert service.process.poll() is None  # still waiting on the model
    llm.release()
    in_flight.join(15)
    assert answers and isinstance(answers[0], requests.Response), f"the run in flight failed: {answers}"
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].json() == {"response": "made it", "conversation_id": "s1"}
    assert exit_code(service, timeout=5) == 0
    assert stored("s1") == [("user", "quick, before you go", "complete"),
                            ("assistant", "made it", "complete")]


def test_sigterm_ends_a_silent_stream_with_shutting_down_and_keeps_the_partial_reply(start_service, llm):
    """A stream the model keeps silent gets a final `shutting_down` event before GRACEFUL_TIMEOUT; the partial reply is kept."""
    graceful = 4
    service = start_service(GRACEFUL_TIMEOUT=graceful)
    llm.script(Script(chunks=["partial ", "never sent"], silence_after=1))
    response = post(service, "/chat/stream", {"message": "tell me everything", "conversation_id": "s2"},
                    stream=True, timeout=(5, 20))
    assert response.status_code == 200
    stream = events(response)
    assert next(e for e in stream if e != PING)["content"] == "partial "
    service.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    rest = [e for e in stream if e != PING]  # read until the service closes the connection
    ended = time.monotonic() - signalled
    assert rest, "the stream closed without a final event"
    final = rest[-1]
    assert len(rest) == 1 and final["is_final"] is True, rest
    assert final["content"] == "" and final["conversation_id"] == "s2"
    assert final["error"]["code"] == "shutting_down", final
    assert 0.5 <= ended < graceful, f"final event {ended:.2f} s after SIGTERM"
    assert stored("s2") == [("user", "tell me everything", "complete"), ("assistant", "partial ", "error")]
    assert llm.wait_for_disconnects(1, timeout=5)  # the request to the model was closed too
    assert exit_code(service, timeout=graceful + 5) == 0
