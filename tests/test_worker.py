"""The worker's responses: a response's head goes out in the same write as the first of its body."""

import os

import pytest
import requests
from gunicorn.config import Config
from gunicorn.http.wsgi import FileWrapper

import worker
from tests.helpers import bearer

STATIC_FILES = ['css/chat.css', 'js/api.js', 'favicon.svg']


class Wire:
    """A client's socket that records each write the worker makes."""

    timeout = None

    def __init__(self):
        """Nothing written yet."""
        self.writes = []

    def settimeout(self, seconds):
        """The write deadline, as a socket takes it."""
        self.timeout = seconds

    def send(self, data, *flags):
        """Take all of `data` in one write."""
        self.writes.append(bytes(data))
        return len(data)

    def sendfile(self, file, offset=0, count=None):
        """A file, straight from its descriptor."""
        file.seek(offset)
        self.writes.append(file.read(count))


class Request:
    """What gunicorn's response needs of the request it answers."""

    version = (1, 1)
    headers = []

    def __init__(self, method="GET"):
        """A request of `method`."""
        self.method = method

    def should_close(self):
        """The connection is kept alive."""
        return False


def response_on(wire, method="GET"):
    """The worker's response to a `method` request, written through a ClientConnection onto `wire`."""
    connection = worker.ClientConnection(wire, read_seconds=5, write_seconds=5)
    return worker.Response(Request(method), connection, Config())


def test_the_head_goes_in_the_same_write_as_the_body():
    """A body of known length: its head and the body in one write."""
    wire = Wire()
    response = response_on(wire)
    response.start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", "2")])
    response.write(b"{}")
    response.close()
    assert len(wire.writes) == 1
    assert wire.writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and wire.writes[0].endswith(b"\r\n\r\n{}")


def test_a_stream_sends_its_head_with_its_first_event_then_each_event_alone():
    """A chunked body (an event stream): head and first chunk in one write, then one write a chunk, then the end."""
    wire = Wire()
    response = response_on(wire)
    response.start_response("200 OK", [("Content-Type", "text/event-stream")])
    response.write(b"data: 1\n\n")
    response.write(b"data: 2\n\n")
    response.close()
    assert len(wire.writes) == 3
    assert wire.writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and wire.writes[0].endswith(b"\r\n\r\n9\r\ndata: 1\n\n\r\n")
    assert wire.writes[1:] == [b"9\r\ndata: 2\n\n\r\n", b"0\r\n\r\n"]


@pytest.mark.parametrize("method,status", [("HEAD", "200 OK"), ("DELETE", "204 No Content")])
def test_a_head_with_no_body_after_it_still_goes(method, status):
    """A HEAD request's answer, or a 204: the head alone, sent when the response closes."""
    wire = Wire()
    response = response_on(wire, method)
    response.start_response(status, [("Content-Length", "0")])
    response.write(b"")
    response.close()
    assert len(wire.writes) == 1 and wire.writes[0].startswith(f"HTTP/1.1 {status}\r\n".encode())


def test_a_file_sent_from_its_descriptor_comes_after_its_head(tmp_path):
    """A static file gunicorn sends with sendfile: the head is written first, then the file."""
    path = tmp_path / "page.html"
    path.write_bytes(b"<p>hi</p>")
    wire = Wire()
    response = response_on(wire)
    response.start_response("200 OK", [("Content-Length", str(os.path.getsize(path)))])
    with open(path, "rb") as file:
        assert response.sendfile(FileWrapper(file))
    response.close()
    assert len(wire.writes) == 2
    assert wire.writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and wire.writes[0].endswith(b"\r\n\r\n")
    assert wire.writes[1] == b"<p>hi</p>"


def test_nothing_held_is_left_for_the_next_answer():
    """A head held when an answer is given up on (its app failed) is dropped, not sent before the next answer."""
    wire = Wire()
    connection = worker.ClientConnection(wire, read_seconds=5, write_seconds=5)
    connection.hold_next()
    connection.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
    connection.answered()
    connection.sendall(b"next")
    assert wire.writes == [b"next"]


def test_real_answers_through_the_worker(service):
    """Under gunicorn: a JSON answer, a HEAD, a static file and an event stream all arrive whole."""
    status = requests.get(service.url + "/status", timeout=10)
    assert status.status_code == 200 and status.json()["database"]["state"] == "ok"
    head = requests.head(service.url + "/status", timeout=10)
    assert head.status_code == 200 and head.content == b""
    page = requests.get(service.url + "/", timeout=10)
    assert page.status_code == 200 and b"<html" in page.content.lower()
    for name in STATIC_FILES:
        static = requests.get(f"{service.url}/static/{name}", timeout=10)
        assert static.status_code == 200 and len(static.content) == int(static.headers["Content-Length"]) > 0
    stream = requests.post(service.url + "/chat/stream", json={"message": "hi", "conversation_id": "w1"},
                           headers=bearer("alice"), timeout=10)
    assert stream.status_code == 200 and stream.text.endswith("\n\n") and '"is_final": true' in stream.text
