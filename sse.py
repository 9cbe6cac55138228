"""Server-sent events framing: one JSON object a `data:` line, so content can never split an event."""

import json

PING = b": ping\n\n"


def event(payload):
    """One SSE event carrying `payload` as JSON (newlines in strings stay escaped)."""
    try:
        text = json.dumps(payload, ensure_ascii=False, separators=(", ", ": "))
        return b"data: " + text.encode("utf-8") + b"\n\n"
    except UnicodeEncodeError:
        # A lone surrogate from the model cannot be UTF-8; \u escapes can carry it.
        return b"data: " + json.dumps(payload).encode("ascii") + b"\n\n"


def chunk(content):
    """The event for one piece of the reply."""
    return event({"content": content, "is_final": False, "metrics": None})
