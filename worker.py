"""The gunicorn worker: gevent's, with deadlines on what a client sends and on what it reads.

gunicorn's gevent worker waits on a client as long as the client likes: a connection that
sends nothing, or a request whose headers or body never finish, holds its connection, and a
client that stops reading holds the turn that writes to it. Here a connection's first request
must begin within CLIENT_READ_TIMEOUT_SECONDS of the connection and each request arrive whole
within as long of its first byte (a kept-alive connection may wait for its next request as long
as gunicorn's keep-alive allows), and a client must take part of what is written to it within
each SSE_WRITE_TIMEOUT_SECONDS; past either, the client is treated as gone.
"""

import errno
import json
import logging
import socket
import time

import click
import gunicorn.http.wsgi
import gunicorn.util
from gunicorn.errors import AppImportError
from gunicorn.http.errors import NoMoreData
from gunicorn.workers.ggevent import GeventWorker

log = logging.getLogger(__name__)

# The Server header names the software; the service does not say what it runs on.
gunicorn.http.wsgi.SERVER = "chat-api"
# What gunicorn itself refuses (a request line or headers too long, a malformed request) is answered
# in the service's one error shape too, not as an HTML page.
ERROR_CODES = {400: "invalid_request", 403: "forbidden", 414: "too_large", 417: "invalid_request",
               431: "too_large", 500: "internal_error", 501: "not_implemented"}


def write_json_error(sock, status, reason, detail):
    """gunicorn's own error answer, as `{"error": {"code", "message"}}` (its detail, which may quote the
    request, is left out)."""
    body = json.dumps({"error": {"code": ERROR_CODES.get(status, "invalid_request"),
                                 "message": reason.lower()}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    gunicorn.util.write_nonblock(sock, head + body)


gunicorn.util.write_error = write_json_error


class Response(gunicorn.http.wsgi.Response):
    """gunicorn's response, its head sent in the same write as the first of its body.

    gunicorn writes the status line and headers, then each piece of the body: two system calls
    and two segments for every answer, where a client waiting for its first event wakes twice.
    """

    def send_headers(self):
        """Hand the head to the connection, which sends it with the next write."""
        if not self.headers_sent:
            self.sock.hold_next()
        super().send_headers()

    def close(self):
        """End the body; a head with no body after it (204, HEAD) goes now."""
        try:
            super().close()
        finally:
            self.sock.send_held()

    def sendfile(self, respiter):
        """The head goes before the file gunicorn sends straight from its descriptor."""
        self.send_headers()
        self.sock.send_held()
        return super().sendfile(respiter)


gunicorn.http.wsgi.Response = Response


class ClientTooSlow(NoMoreData):
    """The client did not send its request in time (gunicorn drops such a connection quietly)."""

    def __str__(self):
        """What happened, for gunicorn's debug log."""
        return "the request did not arrive in time"


class ClientConnection:
    """A client's socket, with a deadline on each request it sends and on each write it must take."""

    def __init__(self, sock, read_seconds, write_seconds):
        """Wrap gunicorn's client `sock`, accepted just now."""
        self._sock = sock
        self.read_seconds = read_seconds
        self.write_seconds = write_seconds
        # The first request is due like the rest of one: a connection is not an invitation to wait.
        self._first_due = time.monotonic() + read_seconds
        self._deadline = None
        self._too_slow = False
        self._holding = False  # the next write is a response's head: kept, to go with the write after it
        self._held = b""

    def recv(self, size, *flags):
        """Read what the client sent: a later request on the connection may take its time to begin, not to arrive."""
        if self._too_slow:
            raise ClientTooSlow()
        if self._deadline is None and self._first_due is None:
            # Waiting for a later request to begin: gunicorn bounds this by its keep-alive timeout.
            self._sock.settimeout(None)
            data = self._sock.recv(size, *flags)
            self._deadline = time.monotonic() + self.read_seconds
            return data
        data = self._recv_by(self._deadline or self._first_due, size, flags)
        if self._deadline is None:  # the first request began
            self._first_due, self._deadline = None, time.monotonic() + self.read_seconds
        return data

    def _recv_by(self, deadline, size, flags):
        """Read what the client sent, if it sends before `deadline`; else it is too slow."""
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise socket.timeout()
            self._sock.settimeout(left)
            return self._sock.recv(size, *flags)
        except socket.timeout:
            # The rest of this request never comes, so the connection can carry no other.
            self._too_slow = True
            raise ClientTooSlow() from None

    def sendall(self, data, *flags):
        """Write to the client, which must take part of it within each write deadline, else it is gone.

        A socket's own sendall bounds the whole write, so a client reading a large one slowly but
        steadily would be dropped: here each part the client takes renews the deadline.
        """
        if self._holding:
            self._holding, self._held = False, data
            return
        if self._held:
            data, self._held = self._held + data, b""
        if self._sock.timeout != self.write_seconds:
            self._sock.settimeout(self.write_seconds)
        try:
            sent = self._sock.send(data, *flags)
            if sent < len(data):  # the client's buffers are full: the rest goes as it reads
                rest = memoryview(data)[sent:]
                while rest:
                    rest = rest[self._sock.send(rest, *flags):]
        except socket.timeout:
            log.info("the client read nothing for %g s; treated as gone", self.write_seconds)
            raise BrokenPipeError(errno.EPIPE, "the client stopped reading") from None

    def hold_next(self):
        """Keep the next write (a response's head) to send with the one after it."""
        self._holding = True

    def send_held(self):
        """Send what is held, if anything."""
        self._holding = False
        if self._held:
            self.sendall(b"")

    def answered(self):
        """The request has been answered: the next one starts a new deadline (and nothing held is left behind)."""
        self._deadline = None
        self._holding, self._held = False, b""

    def __getattr__(self, name):
        """Everything else is the socket's."""
        return getattr(self._sock, name)


class Worker(GeventWorker):
    """gunicorn's gevent worker, its clients held to the deadlines the app is configured with."""

    def load_wsgi(self):
        """Build the app; a setting it cannot start with stops gunicorn with one line (`Error: ...`), no traceback."""
        try:
            super().load_wsgi()
        except click.ClickException as exc:  # config.ConfigError
            raise AppImportError(f"Error: {exc.format_message()}") from None

    def handle(self, listener, client, addr):
        """Serve a connection through a ClientConnection."""
        client.setblocking(1)
        config = self.wsgi.config
        connection = ClientConnection(client, config["CLIENT_READ_TIMEOUT_SECONDS"],
                                      config["SSE_WRITE_TIMEOUT_SECONDS"])
        super(GeventWorker, self).handle(listener, connection, addr)

    def handle_request(self, listener_name, req, sock, addr):
        """Serve one request, then let the next one on the connection begin."""
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            sock.answered()
