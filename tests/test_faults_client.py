"""A client that hangs up mid-stream, over the real gunicorn + gevent service.

The service only learns that the client left when a write fails (a chunk, or a `: ping`
heartbeat while the model is silent). Then it closes its request to the model, keeps the
user message and the partial reply with status `interrupted`, and lets go of the
conversation, so the next turn works and carries on from the partial reply.
"""

import json
import re
import socket
import time

import pytest

from tests.fake_llm import Script
from tests.helpers import assert_next_turn_sees, complete, stored_messages, token, wait_until

# Each scenario breaks something on purpose and waits for the service to notice: seconds each.
pytestmark = pytest.mark.slow

DATA_EVENT = re.compile(rb"data: ([^\r\n]*)\n\n")
PING_FRAME = b": ping\n\n"


class RawStream:
    """A hand-written HTTP/1.1 POST /chat/stream over a plain socket, read as far as a test wants."""

    def __init__(self, service, message, conversation_id, user="alice"):
        """Connect and send the request."""
        body = json.dumps({"message": message, "conversation_id": conversation_id}).encode()
        head = (f"POST /chat/stream HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{service.port}\r\n"
                f"Authorization: Bearer {token(user)}\r\n"
                f"Content-Type: application/json\r\n"
                f"Accept: text/event-stream\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.sock = socket.create_connection(("127.0.0.1", service.port), timeout=10)
        self.sock.sendall(head + body)
        self.received = b""

    def read_until(self, done, timeout=10):
        """Read until `done(received)` holds; fail if the server closes or stays silent first."""
        deadline = time.monotonic() + timeout
        while not done(self.received):
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            assert data, f"the server closed the stream early: {self.received!r}"
            self.received += data
        return self.received

    def first_event(self):
        """Read until the first complete data event and return it."""
        self.read_until(lambda received: DATA_EVENT.search(received) is not None)
        assert self.received.startswith(b"HTTP/1.1 200 "), self.received[:200]
        return json.loads(DATA_EVENT.search(self.received).group(1))

    def events(self):
        """The data events read so far."""
        return [json.loads(m) for m in DATA_EVENT.findall(self.received)]

    def close(self):
        """Hang up."""
        self.sock.close()


def hang_up(client, llm, conversation_id, within):
    """Hang up: the model is let go `within` seconds, and both messages of the turn are kept soon after."""
    client.close()
    left = time.monotonic()
    assert llm.wait_for_disconnects(1, timeout=5)
    assert time.monotonic() - left < within, "the model was let go long after the client left"
    assert wait_until(lambda: len(stored_messages(conversation_id)) == 2, timeout=5)


def test_client_hanging_up_while_the_model_streams_closes_the_model_request(start_service, llm):
    """The client reads one chunk and leaves while the model keeps talking: within a chunk or two the model is let go."""
    chunk_delay = 0.2
    chunks = [f"w{n} " for n in range(50)]  # ten seconds of talking if nobody stopped it
    service = start_service()
    llm.script(Script(chunks=chunks, chunk_delay=chunk_delay))
    client = RawStream(service, "talk to me", "c1")
    first = client.first_event()
    assert first == {"content": "w0 ", "is_final": False, "metrics": None}
    hang_up(client, llm, "c1", within=10 * chunk_delay)
    (user, user_text, user_status), (role, partial, status) = stored_messages("c1")
    assert (user, user_text, user_status) == ("user", "talk to me", "complete")
    assert (role, status) == ("assistant", "interrupted")
    whole = "".join(chunks)
    assert partial.startswith("w0 ") and whole.startswith(partial) and len(partial) < len(whole)
    assert_next_turn_sees(service, llm, "c1", ["talk to me", partial])


def test_client_hanging_up_while_the_model_is_silent_is_noticed_by_the_heartbeat(start_service, llm):
    """First chunk sent, then the model is silent: a failing `: ping` write reveals the hang-up."""
    heartbeat = 0.2
    service = start_service(SSE_HEARTBEAT_SECONDS=heartbeat)
    llm.script(Script(chunks=["first ", "never sent"], silence_after=1))
    client = RawStream(service, "talk to me", "c2")
    assert client.first_event()["content"] == "first "
    # The model is silent now: the stream carries heartbeats only.
    client.read_until(lambda received: PING_FRAME in received[received.index(b"data: "):])
    hang_up(client, llm, "c2", within=10 * heartbeat)
    assert stored_messages("c2") == [("user", "talk to me", "complete"), ("assistant", "first ", "interrupted")]
    assert llm.active_streams == 0
    assert_next_turn_sees(service, llm, "c2", ["talk to me", "first "])


def test_raw_client_reading_to_the_end_gets_the_whole_reply(start_service, llm):
    """The raw client itself is sound: read to the end it gets every chunk and a final event, kept `complete`."""
    service = start_service()
    llm.script(Script(chunks=["a ", "b ", "c"]))
    client = RawStream(service, "hi", "c3")
    client.read_until(lambda received: b'"is_final": true' in received)
    client.close()
    received = client.events()
    assert [e["content"] for e in received] == ["a ", "b ", "c", ""]
    assert received[-1]["is_final"] is True and "error" not in received[-1]
    assert stored_messages("c3") == complete(("hi", "a b c"))
    assert llm.disconnects == 0
