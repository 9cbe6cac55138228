"""A server-sent events reader for tests: events as dicts, heartbeats as PING, ids on request."""

import json

PING = "ping"


def events_with_ids(response):
    """Yield (id, payload) for each event of a streamed `requests` response, and (None, PING) per comment."""
    data, event_id = [], None
    for line in response.iter_lines(chunk_size=1, decode_unicode=False):
        line = line.decode("utf-8")
        if line.startswith(":"):
            yield None, PING
        elif line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and data:
            yield event_id, json.loads("\n".join(data))
            data, event_id = [], None
        elif line:
            raise AssertionError(f"not an SSE line: {line!r}")


def data_events_in(text):
    """The `data:` events of a stream's whole text, already read."""
    return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]


def events(response):
    """Yield each event of a streamed `requests` response: a dict per `data:` event, PING per comment."""
    for _, payload in events_with_ids(response):
        yield payload


def next_data(received):
    """The next `data:` event of an iterator of events, pings skipped."""
    return next(event for event in received if event != PING)


def rest_of(received):
    """The remaining `data:` events of an iterator of events, pings left out."""
    return [event for event in received if event != PING]


def data_events(response):
    """The `data:` events of a whole stream, pings left out."""
    return rest_of(events(response))
