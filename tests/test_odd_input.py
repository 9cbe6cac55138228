"""Odd input from clients and models, and answers gunicorn gives itself: never a 500, always the one error shape."""

import contextlib
import gc
import json
import logging

import requests

from tests.fake_llm import Script
from tests.helpers import assert_error, bearer, cursor_of

DEEP = b"[" * 5000 + b"]" * 5000


@contextlib.contextmanager
def no_collection():
    """No garbage collection meanwhile: one started while the parser is as deep as Python lets it go would run
    other tests' finalizers (a temporary folder's, say) without the stack they need, which pytest reports as
    an error of this test. In the service such a finalizer's failure is only printed."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_deeply_nested_cursor_is_a_400_not_a_500(pg_client):
    """A forged cursor of nested brackets (a 1,600-character query string) is refused as any other forged one."""
    cursor = cursor_of(b"[" * 1200)
    assert len(cursor) < 4000  # within gunicorn's request line limit
    for path in ("/conversations", "/conversations/demo-1"):
        response = pg_client.get(f"{path}?cursor={cursor}", headers=bearer())
        assert_error(response, 400, "invalid_request")


def test_model_answer_nested_too_deep_is_a_502_not_a_500(pg_client, llm, caplog):
    """/chat/run: a model whose answer is JSON nested deeper than the parser goes is a bad response, not a bug,
    and logs no traceback."""
    llm.script(Script(raw=[DEEP]))
    with caplog.at_level(logging.ERROR), no_collection():
        response = pg_client.post("/chat/run", json={"message": "hi"}, headers=bearer())
    assert_error(response, 502, "llm_bad_response")
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


def test_stream_chunk_nested_too_deep_is_llm_bad_response_without_a_traceback(pg_client, llm, caplog):
    """/chat/stream: a chunk nested too deep ends the stream with llm_bad_response, and logs no traceback."""
    llm.script(Script(raw=[b"data: " + DEEP + b"\n\n"]))
    with caplog.at_level(logging.ERROR), no_collection():
        response = pg_client.post("/chat/stream", json={"message": "hi"}, headers=bearer())
        body = response.get_data(as_text=True)
    finals = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]
    assert finals[-1]["error"]["code"] == "llm_bad_response", finals[-1]
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


def test_deeply_nested_cursor_is_a_400_under_gunicorn(service):
    """The same forged cursor against the service under gunicorn."""
    response = requests.get(f"{service.url}/conversations?cursor={cursor_of(b'[' * 1200)}",
                            headers={**bearer(), "Connection": "close"}, timeout=10)
    assert_error(response, 400, "invalid_request")


def test_a_deleted_conversation_is_not_replayed_on_the_embedded_defaults(make_app, llm, tmp_path):
    """SQLite + the in-process cache: after DELETE, GET /chat/stream/{id} is a 404, not the deleted reply."""
    client = make_app(DATABASE_URL=f"sqlite:///{tmp_path / 'chat.db'}", REDIS_URL=None).test_client()
    llm.script(Script(reply="a private reply"))
    client.post("/chat/stream", json={"message": "secret", "conversation_id": "c1"}, headers=bearer()).get_data()
    assert client.delete("/conversations/c1", headers=bearer()).status_code == 204
    replay = client.get("/chat/stream/c1", headers=bearer())
    assert replay.status_code == 404, replay.get_data(as_text=True)


def test_a_refit_that_fails_counts_one_turn(pg_client, llm):
    """Empty stream, the model says it does not fit, the shorter ask fails: one turn ended, one model error."""
    from prometheus_client import REGISTRY

    def turns():
        return REGISTRY.get_sample_value("chat_turns_total", {"kind": "stream", "outcome": "error"}) or 0

    pg_client.post("/chat/run", json={"message": "earlier", "conversation_id": "c1"}, headers=bearer())
    llm.script(Script(raw=[b": nothing\n\n"]), Script(status=400, error_message="maximum context length exceeded"),
               Script(status=500))
    before = turns()
    body = pg_client.post("/chat/stream", json={"message": "now", "conversation_id": "c1"},
                          headers=bearer()).get_data(as_text=True)
    assert '"llm_error"' in body, body
    assert turns() - before == 1


def test_a_request_line_too_long_is_answered_in_the_one_error_shape(service):
    """A URL past gunicorn's 4094-byte request line: gunicorn's 414, in the JSON error shape every route promises."""
    response = requests.get(f"{service.url}/conversations?cursor={'A' * 5000}",
                            headers={**bearer(), "Connection": "close"}, timeout=10)
    assert_error(response, 414, "too_large")
