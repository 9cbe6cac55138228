"""A server-sent events reader for tests: events as dicts, heartbeats as PING."""

import json

PING = "ping"


def events(response):
    """Yield each event of a streamed `requests` response: a dict per `data:` event, PING per comment."""
    data = []
    for line in response.iter_lines(chunk_size=1, decode_unicode=False):
        line = line.decode("utf-8")
        if line.startswith(":"):
            yield PING
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and data:
            yield json.loads("\n".join(data))
            data = []
        elif line:
            raise AssertionError(f"not an SSE line: {line!r}")


def next_data(received):
    """The next `data:` event of an iterator of events, pings skipped."""
    return next(event for event in received if event != PING)


def rest_of(received):
    """The remaining `data:` events of an iterator of events, pings left out."""
    return [event for event in received if event != PING]


def data_events(response):
    """The `data:` events of a whole stream, pings left out."""
    return rest_of(events(response))
