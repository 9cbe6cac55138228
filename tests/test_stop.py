"""POST /chat/stop: ending a streamed reply early, from any connection, worker or service."""

import threading

import pytest

import models
from tests.fake_llm import Script
from tests.helpers import (
    assert_error,
    bearer,
    complete,
    listening_for_stops,
    seen_by_model,
    slow_stream,
    stored_messages,
    wait_until,
)
from tests.sse_client import data_events_in, rest_of


def start_turn(service, conversation_id, user="alice"):
    """Finish a first (non-streamed) turn, so the conversation exists."""
    with service.run("first", conversation_id, user=user) as response:
        assert response.status_code == 200, response.text


def stop(service, conversation_id, user="alice"):
    """POST /chat/stop for `conversation_id` on a new connection: (status, JSON body)."""
    with service.post("/chat/stop", {"conversation_id": conversation_id}, user=user, timeout=10) as response:
        return response.status_code, response.json()


def stop_mid_stream(llm, redis_client, streaming, stopping, conversation_id):
    """A slow stream on `streaming`, stopped through `stopping`: (the stop's answer, the rest of the stream)."""
    with slow_stream(streaming, llm, conversation_id) as stream:
        assert wait_until(lambda: listening_for_stops(redis_client), timeout=10)
        answer = stop(stopping, conversation_id)
        return answer, rest_of(stream)


@pytest.fixture
def stopped(service, llm, redis_client):
    """A stream of conversation s1 that was stopped after its first chunk: (service, stop response, rest)."""
    start_turn(service, "s1")
    return (service, *stop_mid_stream(llm, redis_client, service, service, "s1"))


def test_stop_is_accepted_with_202(stopped):
    """Stopping an open stream answers 202 naming the conversation."""
    _, answer, _ = stopped
    assert answer == (202, {"conversation_id": "s1", "stopping": True})


def test_a_stopped_stream_ends_with_a_final_stopped_event(stopped):
    """After the stop the stream sends one final event, finish_reason 'stopped', and no error."""
    _, _, remaining = stopped
    final, = remaining
    assert final["is_final"] is True and final["content"] == ""
    assert final["finish_reason"] == "stopped"
    assert "error" not in final
    assert final["metrics"]["completion_tokens"] == 2


def test_the_partial_reply_is_saved_as_stopped(stopped):
    """The reply streamed until the stop is kept with status 'stopped'."""
    assert stored_messages("s1")[2:] == [("user", "second", "complete"), ("assistant", "partial ", "stopped")]


def test_stopping_closes_the_connection_to_the_model(stopped, llm):
    """The service hangs up on the model rather than let it talk on."""
    assert llm.wait_for_disconnects(1)
    assert wait_until(lambda: llm.active_streams == 0, timeout=10)


def test_the_next_turn_after_a_stop_works_and_sees_the_partial_reply(stopped, llm):
    """The conversation is free again, and its next turn carries the stopped reply as history."""
    service, _, _ = stopped
    llm.script(Script(reply="fine"))
    with service.run("third", "s1") as response:
        assert response.status_code == 200 and response.json()["response"] == "fine"
    assert seen_by_model(llm) == ["first", "echo: first", "second", "partial ", "third"]


def test_stop_reaches_the_stream_whichever_worker_gets_it(start_service, llm, redis_client):
    """With two workers, a stop on another connection ends the stream wherever it runs."""
    service = start_service(workers=2)
    start_turn(service, "s1")
    (status, _), (final,) = stop_mid_stream(llm, redis_client, service, service, "s1")
    assert status == 202
    assert final["finish_reason"] == "stopped" and "error" not in final


def test_stop_sent_to_another_service_on_the_same_redis_ends_the_stream(start_service, llm, redis_client):
    """A stream on service A is stopped by a stop request to service B."""
    service_a, service_b = start_service(), start_service()
    start_turn(service_a, "s1")
    (status, _), (final,) = stop_mid_stream(llm, redis_client, service_a, service_b, "s1")
    assert status == 202
    assert final["finish_reason"] == "stopped" and "error" not in final
    assert stored_messages("s1")[-1] == ("assistant", "partial ", "stopped")


def test_a_first_turn_can_be_stopped(service, llm, redis_client):
    """The very first turn of a new conversation (not yet in the database) can be stopped too."""
    (status, body), (final,) = stop_mid_stream(llm, redis_client, service, service, "new-1")
    assert status == 202, body
    assert final["finish_reason"] == "stopped"


def test_another_user_cannot_stop_the_stream(service, llm, redis_client):
    """Bob's stop of alice's stream is 404, and her reply runs to the end."""
    start_turn(service, "s1")
    with slow_stream(service, llm, "s1") as stream:
        assert wait_until(lambda: listening_for_stops(redis_client), timeout=10)
        answer = stop(service, "s1", user="bob")
        llm.release()
        remaining = rest_of(stream)
    assert answer == (404, {"error": {"code": "not_found", "message": "conversation not found"}})
    assert [e["content"] for e in remaining] == ["rest of it", ""]
    assert remaining[-1]["finish_reason"] == "stop"
    assert stored_messages("s1")[-1] == ("assistant", "partial rest of it", "complete")


def test_stop_without_a_reply_in_progress_is_409(service, llm):
    """A conversation that is not streaming has nothing to stop."""
    start_turn(service, "s1")
    status, body = stop(service, "s1")
    assert (status, body["error"]["code"]) == (409, "no_reply_in_progress")
    assert stored_messages("s1") == complete(("first", "echo: first"))


def test_stop_of_an_unknown_conversation_is_404(service, llm):
    """A conversation that does not exist (and is not streaming) is not found."""
    status, body = stop(service, "never-was")
    assert (status, body["error"]["code"]) == (404, "not_found")


BAD_BODIES = {"missing": {}, "null": {"conversation_id": None}, "empty": {"conversation_id": ""},
              "number": {"conversation_id": 5}, "space": {"conversation_id": "a b"},
              "too-long": {"conversation_id": "x" * 129}, "list": {"conversation_id": ["s1"]}}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_stop_with_a_missing_or_invalid_conversation_id_is_400(pg_client, body):
    """conversation_id is required and must be a valid id."""
    assert_error(pg_client.post("/chat/stop", json=body, headers=bearer()), 400, "invalid_request")


def test_stop_without_a_token_is_401(pg_client):
    """Stopping needs a bearer token."""
    assert_error(pg_client.post("/chat/stop", json={"conversation_id": "s1"}), 401, "unauthorized")


@pytest.fixture
def embedded_service(start_service, tmp_path):
    """The service on its embedded defaults: a SQLite file and the in-process cache."""
    url = f"sqlite:///{tmp_path / 'x.db'}"
    database = models.open_database(url, 1, 5)
    with models.db.connection_context():
        models.create_tables()
    database.close_all()
    return start_service(REDIS_URL="", DATABASE_URL=url)


def test_stop_works_in_process_on_the_embedded_defaults(embedded_service, llm):
    """Without Redis the stop reaches the stream in the one process, and the partial reply is kept."""
    start_turn(embedded_service, "s1")
    with slow_stream(embedded_service, llm, "s1") as stream:
        assert stop(embedded_service, "s1")[0] == 202
        final, = rest_of(stream)
    assert final["finish_reason"] == "stopped" and "error" not in final
    assert llm.wait_for_disconnects(1)
    assert stored_messages("s1")[-1] == ("assistant", "partial ", "stopped")


def test_a_stop_while_the_model_is_asked_again_cuts_the_new_stream(start_service, llm):
    """Stopped during the one-token question that follows an empty stream: the stream asked for next is cut
    at once; nothing of it is relayed or kept. (Without Redis the stop is heard before /chat/stop answers.)"""
    service = start_service(REDIS_URL="", LLM_TIMEOUT_SECONDS=20)
    start_turn(service, "s1")
    probe_held = Script(status=400, error_message="This model's maximum context length is 2048 tokens",
                        header_delay=None)  # answers once released
    llm.script(Script(raw=[b""]), probe_held, Script(chunks=["never ", "relayed"], first_chunk_delay=1))
    streamed = []
    streaming = threading.Thread(target=lambda: streamed.append(service.turn("stream", "second", "s1")))
    streaming.start()  # its first byte comes only with the final event
    assert llm.wait_for_requests(3)  # the first turn, the empty stream, the question
    assert stop(service, "s1") == (202, {"conversation_id": "s1", "stopping": True})
    llm.release()
    streaming.join(30)
    received = data_events_in(streamed[0].text)
    assert [e["content"] for e in received[:-1]] == []
    assert received[-1]["finish_reason"] == "stopped"
    assert len(llm.requests) == 4 and llm.wait_for_disconnects(1)
    assert stored_messages("s1")[-1] == ("assistant", "", "stopped")
