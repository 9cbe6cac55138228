"""Property: whatever body a client sends, the answer is never a 5xx and errors keep their one shape."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import bearer

ANY_CHARACTER = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, categories=None)
TEXT = st.one_of(st.text(), st.text(alphabet=ANY_CHARACTER, max_size=40),
                 st.sampled_from(["", " ", "\x00", "\ud800", "\n\ndata: x\n\n", "a" * 5000]))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8)
CHAT_BODIES = st.fixed_dictionaries(
    {}, optional={"message": JSON_VALUES | TEXT, "conversation_id": JSON_VALUES | TEXT,
                  "extra": JSON_VALUES})
BODIES = st.one_of(
    CHAT_BODIES.map(lambda body: json.dumps(body).encode()),
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=200))
CONTENT_TYPES = st.sampled_from(["application/json", "application/json; charset=utf-8",
                                 "text/plain", "application/x-www-form-urlencoded", "", "application/xml"])


def assert_well_formed(response):
    """No 5xx; an error is JSON of the one shape."""
    assert response.status_code < 500, response.get_data(as_text=True)
    if response.status_code >= 400:
        error = response.get_json()["error"]
        assert set(error) == {"code", "message"}
        assert isinstance(error["code"], str) and isinstance(error["message"], str)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES, content_type=CONTENT_TYPES, path=st.sampled_from(["/chat/run", "/chat/stream"]))
def test_any_body_gets_a_well_formed_answer(pg_client, body, content_type, path):
    """Random bodies, content types and endpoints never cause a 5xx or an error of another shape."""
    headers = {**bearer("fuzzer"), "Content-Type": content_type} if content_type else bearer("fuzzer")
    response = pg_client.post(path, data=body, headers=headers)
    assert_well_formed(response)
    response.close()
