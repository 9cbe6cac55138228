"""A failing model, over the real gunicorn + gevent service: errors before the stream and mid-stream.

Before the first event every failure is an HTTP error in the one JSON shape and nothing is
kept. Mid-stream the service ends the stream with a final event that carries the error,
keeps what the user saw with status `error`, and the next turn carries on from it.
"""

import threading
import time

import pytest

from tests.fake_llm import Script
from tests.helpers import (
    assert_error,
    assert_next_turn_sees,
    free_port,
    stored_counts,
    stored_messages,
    wait_until,
)
from tests.sse_client import data_events, events, rest_of

# Each scenario breaks something on purpose and waits for the service to notice: seconds each.
pytestmark = pytest.mark.slow

CHUNKS = ["one ", "two ", "three ", "four"]


# --- before the stream: the model cannot be reached or refuses -------------------------------------


@pytest.mark.parametrize("path", ["run", "stream"])
def test_refused_connection_is_502_llm_unavailable(start_service, llm, path):
    """Nobody listening at LLM_BASE_URL: a JSON 502 llm_unavailable, never a 200, nothing kept."""
    service = start_service(LLM_BASE_URL=f"http://127.0.0.1:{free_port()}/v1")
    for _ in range(2):  # the second try proves the failed turn let go of the conversation
        assert_error(service.turn(path, "hi", "c1"), 502, "llm_unavailable")
    assert stored_counts() == (0, 0)
    assert llm.requests == []


@pytest.mark.parametrize("path", ["run", "stream"])
def test_tls_error_is_502_llm_unavailable(start_service, llm, path):
    """An https LLM_BASE_URL whose server speaks plain HTTP: the TLS handshake fails, 502 llm_unavailable."""
    port = llm.url.split(":")[-1].split("/")[0]
    service = start_service(LLM_BASE_URL=f"https://127.0.0.1:{port}/v1", LLM_TIMEOUT_SECONDS=2)
    assert_error(service.turn(path, "hi", "c1"), 502, "llm_unavailable")
    assert stored_counts() == (0, 0)


@pytest.mark.parametrize("status", [500, 503, 400, 401])
def test_upstream_error_status_is_502_llm_error_naming_it(start_service, llm, status):
    """An upstream 4xx/5xx is a 502 llm_error whose message names the upstream status (a 401 is never ours)."""
    service = start_service()
    llm.script(Script(status=status), Script(status=status))
    for path in ("run", "stream"):
        response = service.turn(path, "hi", "c1")
        assert_error(response, 502, "llm_error", mentions=str(status))
        assert "WWW-Authenticate" not in response.headers
    assert len(llm.requests) == 2
    assert stored_counts() == (0, 0)


@pytest.mark.parametrize("retry_after", ["7", None])
def test_upstream_429_is_503_rate_limited_passing_retry_after(start_service, llm, retry_after):
    """An upstream 429 is a 503 llm_rate_limited, with the model's Retry-After when it gave one."""
    service = start_service()
    llm.script(Script(status=429, retry_after=retry_after), Script(status=429, retry_after=retry_after))
    for path in ("run", "stream"):
        response = service.turn(path, "hi", "c1")
        assert_error(response, 503, "llm_rate_limited", mentions="429")
        assert response.headers.get("Retry-After") == retry_after
    assert stored_counts() == (0, 0)


@pytest.mark.parametrize("path", ["run", "stream"])
def test_hanging_model_is_504_and_the_worker_stays_free(start_service, llm, path):
    """A model that never answers gets a 504 llm_timeout after LLM_TIMEOUT_SECONDS; one worker serves others meanwhile and after."""
    service = start_service(workers=1, LLM_TIMEOUT_SECONDS=1)
    llm.script(Script(hang=True))
    answers = []
    hanging = threading.Thread(target=lambda: answers.append(
        (service.turn(path, "hello?", "hung"), time.monotonic())))
    started = time.monotonic()
    hanging.start()
    assert llm.wait_for_requests(1)
    # While the first request waits on the model, the same (only) worker answers another.
    during = service.run("meanwhile", "other-1", timeout=5)
    assert during.status_code == 200 and answers == []
    hanging.join(10)
    response, answered_at = answers[0]
    assert_error(response, 504, "llm_timeout")
    assert 0.9 <= answered_at - started < 5
    # Right after, the worker is free: another conversation answers at once.
    after = service.turn(path, "after", "other-2")
    assert after.status_code == 200
    assert stored_messages("hung") == []
    assert stored_counts()[1] == 4  # only the two other conversations' turns


# --- mid-stream: the model fails after some chunks -------------------------------------------------

MID_STREAM_FAULTS = {
    "connection-drop": (Script(chunks=CHUNKS, break_after=2), {}, "llm_unavailable", 2),
    "non-json-chunk": (Script(chunks=CHUNKS, garbage_after=2), {}, "llm_bad_response", 2),
    "no-done": (Script(chunks=CHUNKS, no_done=True), {}, "llm_incomplete", len(CHUNKS)),
    "silence": (Script(chunks=CHUNKS, silence_after=2), {"LLM_TIMEOUT_SECONDS": 1}, "llm_timeout", 2),
}


@pytest.mark.parametrize("fault", list(MID_STREAM_FAULTS))
def test_mid_stream_fault_ends_with_an_error_event_and_keeps_the_partial_reply(start_service, llm, fault):
    """The chunks before the fault arrive, then one final event with the error; the partial reply is kept as `error`."""
    script, settings, code, delivered = MID_STREAM_FAULTS[fault]
    service = start_service(**settings)
    llm.script(script)
    response = service.stream("tell me", "c1")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    received = data_events(response)
    partial = "".join(CHUNKS[:delivered])
    assert [e["content"] for e in received[:-1]] == CHUNKS[:delivered]
    assert all(e["is_final"] is False and e["metrics"] is None for e in received[:-1])
    final = received[-1]
    assert final["is_final"] is True and final["content"] == ""
    assert final["conversation_id"] == "c1"
    assert isinstance(final["metrics"], dict) and final["metrics"]["processing_time"] >= 0
    assert set(final["error"]) == {"code", "message"}
    assert final["error"]["code"] == code, final["error"]
    assert final["error"]["message"]
    assert stored_messages("c1") == [("user", "tell me", "complete"), ("assistant", partial, "error")]
    assert_next_turn_sees(service, llm, "c1", ["tell me", partial])


def test_silent_model_mid_stream_is_cut_off_upstream(start_service, llm):
    """When the model goes silent past LLM_TIMEOUT_SECONDS the service also closes its request to the model."""
    service = start_service(LLM_TIMEOUT_SECONDS=1)
    llm.script(Script(chunks=CHUNKS, silence_after=1))
    received = rest_of(events(service.stream("tell me", "c1")))
    assert received[-1]["error"]["code"] == "llm_timeout"
    assert llm.wait_for_disconnects(1, timeout=5)
    assert wait_until(lambda: llm.active_streams == 0, timeout=5)


# --- odd but valid model streams -------------------------------------------------------------------


@pytest.mark.parametrize("shape", [
    {"comments": True},
    {"close_delimited": True},
    {"comments": True, "close_delimited": True},
], ids=["comments", "close-delimited", "both"])
def test_comment_lines_and_close_delimited_bodies_stream_normally(start_service, llm, shape):
    """SSE comments from the model are skipped and a body ended by closing is a whole reply."""
    service = start_service()
    llm.script(Script(chunks=CHUNKS, **shape))
    received = data_events(service.stream("tell me", "c1"))
    assert [e["content"] for e in received[:-1]] == CHUNKS
    assert received[-1]["is_final"] is True and "error" not in received[-1]
    assert received[-1]["metrics"]["completion_tokens"] == len(CHUNKS)
    assert stored_messages("c1") == [("user", "tell me", "complete"), ("assistant", "".join(CHUNKS), "complete")]
    assert_next_turn_sees(service, llm, "c1", ["tell me", "".join(CHUNKS)])
