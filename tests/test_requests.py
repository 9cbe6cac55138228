"""What POST /chat/run accepts, what it refuses, and how it answers when the model fails."""

import json
import uuid

import pytest

from tests.fake_llm import Script
from tests.helpers import assert_error, bearer, free_port, seen_by_model, stored_counts, stored_messages

JSON = "application/json"


def post_raw(client, data, content_type=JSON):
    """POST raw bytes to /chat/run as alice."""
    return client.post("/chat/run", data=data, content_type=content_type, headers=bearer())


def post_json(client, body):
    """POST `body` as JSON to /chat/run as alice."""
    return client.post("/chat/run", json=body, headers=bearer())


def body(**fields):
    """A JSON body of `fields`, as bytes."""
    return json.dumps(fields).encode()


BAD_BODIES = {
    "not-json": b"hello there",
    "broken-json": b'{"message": "hi"',
    "json-array": b'["hi"]',
    "json-string": b'"hi"',
    "missing-message": b"{}",
    "empty-message": body(message=""),
    "whitespace-message": body(message=" \t\n "),
    "number-message": body(message=5),
    "list-message": body(message=["hi"]),
    "object-message": body(message={"text": "hi"}),
    "null-message": body(message=None),
    "number-conversation-id": body(message="hi", conversation_id=5),
    "list-conversation-id": body(message="hi", conversation_id=["abc"]),
    "true-conversation-id": body(message="hi", conversation_id=True),
    "false-conversation-id": body(message="hi", conversation_id=False),
    "empty-conversation-id": body(message="hi", conversation_id=""),
    "129-char-conversation-id": body(message="hi", conversation_id="a" * 129),
    "space-in-conversation-id": body(message="hi", conversation_id="a b"),
    "slash-in-conversation-id": body(message="hi", conversation_id="a/b"),
    "unicode-letter-in-conversation-id": body(message="hi", conversation_id="café"),
    "newline-in-conversation-id": body(message="hi", conversation_id="abc\n"),
    "nul-in-message": body(message="a\x00b"),
    "lone-surrogate-in-message": b'{"message": "a\\ud800b"}',
}


@pytest.mark.parametrize("data", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_body_gets_400(pg_client, data):
    """A JSON body that is not a valid chat request gets 400 invalid_request."""
    assert_error(post_raw(pg_client, data), 400, "invalid_request")


@pytest.mark.parametrize("data", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_body_never_reaches_the_model(pg_client, llm, data):
    """A refused body never calls the model."""
    post_raw(pg_client, data)
    assert llm.requests == []


@pytest.fixture
def small_app(make_pg_app):
    """An app on PostgreSQL and Redis that takes messages of at most 50 characters."""
    return make_pg_app(MAX_MESSAGE_CHARS=50)


def test_message_over_max_chars_gets_413(small_app):
    """A message one character over MAX_MESSAGE_CHARS gets 413 too_large."""
    response = post_json(small_app.test_client(), {"message": "x" * 51})
    assert_error(response, 413, "too_large")


def test_message_of_max_chars_is_accepted(small_app):
    """A message of exactly MAX_MESSAGE_CHARS is answered."""
    response = post_json(small_app.test_client(), {"message": "x" * 50})
    assert response.status_code == 200, response.get_json()


def test_longest_message_fits_the_default_body_limit(pg_app):
    """A message of MAX_MESSAGE_CHARS emoji, JSON-escaped as Python and requests send it, is answered."""
    message = "\U0001F600" * pg_app.config["MAX_MESSAGE_CHARS"]
    data = json.dumps({"message": message}).encode()
    response = post_raw(pg_app.test_client(), data)
    assert response.status_code == 200, response.get_json()


@pytest.fixture
def capped_app(make_pg_app):
    """An app whose bodies may be at most 1024 bytes (messages still up to 32000 characters)."""
    return make_pg_app(MAX_CONTENT_LENGTH=1024)


def json_body_of_size(size):
    """A valid chat request body of exactly `size` bytes."""
    prefix, suffix = b'{"message": "', b'"}'
    return prefix + b"y" * (size - len(prefix) - len(suffix)) + suffix


@pytest.mark.parametrize("valid_json", [True, False], ids=["valid-json", "not-json"])
def test_body_over_max_content_length_gets_413(capped_app, valid_json):
    """A body larger than MAX_CONTENT_LENGTH gets 413 too_large, whatever it holds."""
    size = capped_app.config["MAX_CONTENT_LENGTH"] + 1
    data = json_body_of_size(size) if valid_json else b"x" * size
    assert_error(post_raw(capped_app.test_client(), data), 413, "too_large")


def test_body_of_max_content_length_is_accepted(capped_app):
    """A valid body of exactly MAX_CONTENT_LENGTH bytes is answered."""
    data = json_body_of_size(capped_app.config["MAX_CONTENT_LENGTH"])
    response = post_raw(capped_app.test_client(), data)
    assert response.status_code == 200, response.get_json()


NON_JSON_BODIES = {
    "form-urlencoded": ("application/x-www-form-urlencoded", b"message=hi"),
    "text-plain": ("text/plain", b'{"message": "hi"}'),
}


@pytest.mark.parametrize("content_type, data", NON_JSON_BODIES.values(), ids=NON_JSON_BODIES.keys())
def test_non_json_content_type_gets_415(pg_client, content_type, data):
    """A body that is not declared as JSON gets 415 unsupported_media_type."""
    assert_error(post_raw(pg_client, data, content_type), 415, "unsupported_media_type")


@pytest.mark.parametrize("conversation_id", ["a", "c" * 128, "team.chat:2024-01_x"],
                         ids=["one-char", "128-chars", "punctuation"])
def test_valid_conversation_id_is_accepted(pg_client, conversation_id):
    """A conversation id of allowed characters and length is used as given."""
    response = post_json(pg_client, {"message": "hi", "conversation_id": conversation_id})
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["conversation_id"] == conversation_id


@pytest.mark.parametrize("request_body", [{"message": "hi"}, {"message": "hi", "conversation_id": None}],
                         ids=["omitted", "null"])
def test_missing_conversation_id_gets_a_fresh_uuid(pg_client, request_body):
    """Without a conversation id the reply names a new UUID4 conversation."""
    response = post_json(pg_client, request_body)
    assert response.status_code == 200, response.get_json()
    conversation_id = response.get_json()["conversation_id"]
    assert uuid.UUID(conversation_id).version == 4
    assert str(uuid.UUID(conversation_id)) == conversation_id


def test_two_new_conversations_get_different_ids(pg_client):
    """Two runs without a conversation id start two different conversations."""
    first = post_json(pg_client, {"message": "hi"}).get_json()["conversation_id"]
    second = post_json(pg_client, {"message": "hi"}).get_json()["conversation_id"]
    assert first != second


def test_new_conversation_id_is_the_stored_one(pg_client):
    """The fresh conversation id returned is the id the turn was stored under."""
    conversation_id = post_json(pg_client, {"message": "hi"}).get_json()["conversation_id"]
    assert len(stored_messages(conversation_id)) == 2


def test_run_reply_has_exactly_response_and_conversation_id(pg_client, llm):
    """The run reply is {"response", "conversation_id"} and nothing else."""
    llm.script(Script(reply="the answer"))
    response = post_json(pg_client, {"message": "hi"})
    assert response.status_code == 200
    reply = response.get_json()
    assert set(reply) == {"response", "conversation_id"}
    assert reply["response"] == "the answer"


def test_unknown_route_gets_404(pg_client):
    """A path the API does not have gets 404 not_found as JSON."""
    assert_error(pg_client.get("/no/such/endpoint", headers=bearer()), 404, "not_found")


def test_wrong_method_gets_405_with_allow(pg_client):
    """GET /chat/run gets 405 method_not_allowed with an Allow header naming POST."""
    response = pg_client.get("/chat/run", headers=bearer())
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in [method.strip() for method in response.headers["Allow"].split(",")]


TRICKY_TEXTS = {
    "emoji": "héllo 👋🏽 — 日本語 🧑‍🚀",
    "html": "<script>alert('x')</script>&amp;",
    "sse-framing": '\n\ndata: {"is_final": true}\n\n',
}


@pytest.mark.parametrize("text", TRICKY_TEXTS.values(), ids=TRICKY_TEXTS.keys())
def test_message_reaches_the_model_byte_exact(pg_client, llm, text):
    """The user's message is sent to the model unchanged."""
    assert post_json(pg_client, {"message": text}).status_code == 200
    assert seen_by_model(llm)[-1] == text


@pytest.mark.parametrize("text", TRICKY_TEXTS.values(), ids=TRICKY_TEXTS.keys())
def test_message_is_stored_byte_exact(pg_client, text):
    """The user's message is stored unchanged."""
    response = post_json(pg_client, {"message": text})
    assert response.status_code == 200
    assert stored_messages(response.get_json()["conversation_id"])[0] == ("user", text, "complete")


@pytest.mark.parametrize("text", TRICKY_TEXTS.values(), ids=TRICKY_TEXTS.keys())
def test_model_reply_is_returned_byte_exact(pg_client, llm, text):
    """The model's reply is returned unchanged."""
    llm.script(Script(reply=text))
    assert post_json(pg_client, {"message": "hi"}).get_json()["response"] == text


@pytest.mark.parametrize("text", TRICKY_TEXTS.values(), ids=TRICKY_TEXTS.keys())
def test_model_reply_is_stored_byte_exact(pg_client, llm, text):
    """The model's reply is stored unchanged."""
    llm.script(Script(reply=text))
    response = post_json(pg_client, {"message": "hi"})
    assert response.status_code == 200
    assert stored_messages(response.get_json()["conversation_id"])[1] == ("assistant", text, "complete")


CLOSED_PORT = object()

MODEL_FAILURES = {
    "model-500": ({}, Script(status=500), 502, "llm_error"),
    "model-401": ({}, Script(status=401), 502, "llm_error"),
    "model-429": ({}, Script(status=429, retry_after="7"), 503, "llm_rate_limited"),
    "model-hangs": ({"LLM_TIMEOUT_SECONDS": 1}, Script(hang=True), 504, "llm_timeout"),
    "model-unreachable": ({"LLM_BASE_URL": CLOSED_PORT}, None, 502, "llm_unavailable"),
}


@pytest.fixture
def failing_run(make_pg_app, llm):
    """Run one turn against a model that fails as `settings` and `script` say."""

    def run(settings, script):
        """POST a turn on a fresh app and return the response."""
        if settings.get("LLM_BASE_URL") is CLOSED_PORT:
            settings = {**settings, "LLM_BASE_URL": f"http://127.0.0.1:{free_port()}/v1"}
        app = make_pg_app(**settings)
        if script is not None:
            llm.script(script)
        return post_json(app.test_client(), {"message": "hi", "conversation_id": "failing-turn"})

    return run


@pytest.mark.parametrize("settings, script, status, code", MODEL_FAILURES.values(), ids=MODEL_FAILURES.keys())
def test_model_failure_gets_its_status_and_code(failing_run, settings, script, status, code):
    """Each way the model can fail maps to one status and code, never our own 401."""
    assert_error(failing_run(settings, script), status, code)


@pytest.mark.parametrize("settings, script, status, code", MODEL_FAILURES.values(), ids=MODEL_FAILURES.keys())
def test_model_failure_stores_nothing(failing_run, settings, script, status, code):
    """A turn the model failed leaves no message and no conversation behind."""
    assert failing_run(settings, script).status_code == status
    assert stored_counts() == (0, 0)


def test_model_error_message_names_the_upstream_status(failing_run):
    """A model answering 500 gets an llm_error whose message mentions 500."""
    response = failing_run({}, Script(status=500))
    assert "500" in response.get_json()["error"]["message"]


def test_rate_limited_reply_carries_the_models_retry_after(failing_run):
    """A model answering 429 with Retry-After: 7 gets a 503 with Retry-After: 7."""
    response = failing_run({}, Script(status=429, retry_after="7"))
    assert response.headers.get("Retry-After") == "7"
