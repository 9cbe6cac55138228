"""Server-sent events framing: one JSON object a `data:` line, so content can never split an event."""

import json
from json.encoder import encode_basestring  # json.dumps's own string encoder (C), as ensure_ascii=False uses it

PING = b": ping\n\n"
# Valid in SSE, but line breaks to Python's str.splitlines() and to JavaScript: escaped.
LINE_SEPARATORS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\u0085": "\\u0085"})


def data(payload):
    """The `data:` text of an event carrying `payload` as JSON (line breaks in strings stay escaped).

    Text from the model reaches here cleaned (llm.cleaned): no lone surrogate, so it is UTF-8.
    """
    return escaped(json.dumps(payload, ensure_ascii=False, separators=(", ", ": ")))


def escaped(text):
    """JSON text with the line separators Python's and JavaScript's line splitting break on escaped."""
    if "\u2028" in text or "\u2029" in text or "\u0085" in text:
        return text.translate(LINE_SEPARATORS)
    return text


def frame(event_id, text):
    """One event: its id line and its `data:` line of JSON text."""
    return f"id: {event_id}\ndata: {text}\n\n".encode("utf-8")


def unnumbered(text):
    """An event with no id line, for what is not an event of the turn: an SSE client keeps the last id it had."""
    return f"data: {text}\n\n".encode("utf-8")


def chunk_data(content):
    """The `data:` text of the event for one piece of the reply: `data()` of it, written out, since it is
    made for every chunk."""
    return escaped('{"content": ' + encode_basestring(content) + ', "is_final": false, "metrics": null}')


def content_of(text):
    """The content of a chunk event, from its `data:` text."""
    return json.loads(text)["content"]
