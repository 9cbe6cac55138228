"""The service's own event framing (sse.py): the JSON of every event, and its written-out chunk events."""

import json

from hypothesis import given
from hypothesis import strategies as st

import sse

# Text as the model's reaches sse.py: cleaned, so no lone surrogate (llm.cleaned).
KEPT_TEXT = st.text(st.characters(exclude_categories=["Cs"]))


@given(KEPT_TEXT)
def test_a_chunk_event_is_the_json_of_its_payload(content):
    """The written-out chunk event is byte for byte what data() makes of the same payload."""
    assert sse.chunk_data(content) == sse.data({"content": content, "is_final": False, "metrics": None})


@given(KEPT_TEXT)
def test_an_event_is_one_line_of_json_for_every_line_splitter(content):
    """No line break of Python's str.splitlines() or of JavaScript survives unescaped in an event's JSON."""
    text = sse.data({"content": content, "metrics": None})
    assert text.splitlines() == [text]
    assert json.loads(text)["content"] == content


def test_the_line_separators_are_escaped_not_dropped():
    """U+2028, U+2029 and U+0085 go out as JSON escapes and come back as themselves."""
    text = sse.chunk_data("a\u2028b\u2029c\u0085d")
    assert "\\u2028" in text and "\\u2029" in text and "\\u0085" in text
    assert json.loads(text)["content"] == "a\u2028b\u2029c\u0085d"
