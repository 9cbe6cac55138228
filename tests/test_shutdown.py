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

import pytest
import requests

from tests.fake_llm import Script
from tests.helpers import complete, stored_messages, wait_until
from tests.sse_client import events, next_data, rest_of

# Each scenario breaks something on purpose and waits for the service to notice: seconds each.
pytestmark = pytest.mark.slow


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
            answers.append(service.run("quick, before you go", "s1", timeout=30))
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
    assert stored_messages("s1") == complete(("quick, before you go", "made it"))


def test_sigterm_ends_a_silent_stream_with_shutting_down_and_keeps_the_partial_reply(start_service, llm):
    """A stream the model keeps silent gets a final `shutting_down` event before GRACEFUL_TIMEOUT; the partial reply is kept."""
    graceful = 4
    service = start_service(GRACEFUL_TIMEOUT=graceful)
    llm.script(Script(chunks=["partial ", "never sent"], silence_after=1))
    response = service.stream("tell me everything", "s2")
    assert response.status_code == 200
    stream = events(response)
    assert next_data(stream)["content"] == "partial "
    service.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    rest = rest_of(stream)  # read until the service closes the connection
    ended = time.monotonic() - signalled
    assert rest, "the stream closed without a final event"
    final = rest[-1]
    assert len(rest) == 1 and final["is_final"] is True, rest
    assert final["content"] == "" and final["conversation_id"] == "s2"
    assert final["error"]["code"] == "shutting_down", final
    assert 0.5 <= ended < graceful, f"final event {ended:.2f} s after SIGTERM"
    assert stored_messages("s2") == [("user", "tell me everything", "complete"), ("assistant", "partial ", "error")]
    assert llm.wait_for_disconnects(1, timeout=5)  # the request to the model was closed too
    assert exit_code(service, timeout=graceful + 5) == 0
