"""Logging: JSON lines on stdout, and one line per request saying what happened (never any text or token)."""

import json
import logging
import re
import secrets
import sys
import time


REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
RECORD_KEY = "chat.request_log"
ROUTE_KEY = "chat.route"
requests_log = logging.getLogger("chat.requests")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, the process (which gunicorn worker), and message or a
    request's fields."""

    def format(self, record):
        """The record as one line of JSON."""
        line = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(), "logger": record.name, "pid": record.process}
        if isinstance(record.msg, dict):
            line.update(record.msg)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level):
    """Send every log record to stdout as JSON at `level` (once per process)."""
    root = logging.getLogger()
    if not any(getattr(h, "chat_json", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonFormatter())
        handler.formatter.converter = time.gmtime
        handler.chat_json = True
        root.addHandler(handler)
    root.setLevel(level.upper())


class RequestLog:
    """WSGI middleware: a request id for every request and one log line when its response is done."""

    def __init__(self, app, on_done=None):
        """Wrap the WSGI `app`; `on_done(route, method, status)` hears of each request answered."""
        self.app = app
        self.on_done = on_done

    def __call__(self, environ, start_response):
        """Serve the request, then log it when the server closes the response (streams included)."""
        started = time.monotonic()
        given = environ.get("HTTP_X_REQUEST_ID", "")
        request_id = given if REQUEST_ID.fullmatch(given) else secrets.token_hex(16)
        record = {"request_id": request_id, "method": environ.get("REQUEST_METHOD"),
                  "path": environ.get("PATH_INFO")}
        environ[RECORD_KEY] = record

        def start(status, headers, exc_info=None):
            """Note the status and return the request id."""
            record["status"] = int(status.split(" ", 1)[0])
            headers.append(("X-Request-Id", request_id))
            return start_response(status, headers, exc_info)

        def done():
            """Write the request's line."""
            record["duration_ms"] = round((time.monotonic() - started) * 1000, 2)
            requests_log.info(record)
            if self.on_done is not None:
                self.on_done(environ.get(ROUTE_KEY, "unmatched"), record["method"], record.get("status"))

        return LoggedBody(self.app(environ, start), done)


class LoggedBody:
    """A response body that writes the request's log line when the server closes it.

    The server iterates the app's own body, not a wrapper around each piece (a stream's
    events go out without a layer of ours between them and the socket).
    """

    def __init__(self, body, on_close):
        """Serve `body`; call `on_close()` after closing it."""
        self.body = body
        self._on_close = on_close

    def __iter__(self):
        """The app's body itself."""
        return iter(self.body)

    def close(self):
        """Close the app's body, then log."""
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            self._on_close()
