"""The bare minimum: the least the specification's turn can cost on gunicorn's gevent worker.

A WSGI function, no framework: it checks the JWT (PyJWT, as flask-jwt-extended does), reads the
conversation's recent messages from Redis (one round trip), sends the model the message on a kept
socket, and for each event the model sends does one `recv`, one `json.loads`, one event framed and
one `send` (gunicorn's); then it adds both messages to Redis (one round trip) and to PostgreSQL
(psycopg2, one INSERT in autocommit). No lease, journal, ownership, budget, metrics, log or error
handling. bench/run.py runs it as the floor of the turn, the relay and the time to first token: a
figure it cannot reach on the machine at hand, no service on this stack can.

It reads the fake model's stream (tests/fake_llm.py, one event per HTTP chunk) and nothing else:
it is a measuring tool, not a client for any other server.
"""

import json
import os
import socket
from urllib.parse import urlsplit

import jwt
import psycopg2
import redis
from gevent.lock import BoundedSemaphore

STATUS = b'{"status": "ok"}'
FINAL = b'data: {"content": "", "is_final": true, "metrics": null}\n\n'
END = b"0\r\n\r\n"
RECENT = 20
POOL_SIZE = 10  # database connections, as many as the service keeps by default
REDIS_CONNECTIONS = 50  # likewise


class Model:
    """The fake model at LLM_BASE_URL, over kept connections."""

    def __init__(self, base_url, model):
        """Where the model is, and its name."""
        parts = urlsplit(base_url)
        self.address = (parts.hostname, parts.port)
        self.head = (f"POST {parts.path.rstrip('/')}/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                     "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n")
        self.model = model
        self.idle = []

    def ask(self, messages, stream):
        """A kept socket with the request sent, and what of the answer came with its head."""
        asked = {"model": self.model, "messages": messages, "stream": stream}
        if stream:
            asked["stream_options"] = {"include_usage": True}  # as the service asks
        body = json.dumps(asked).encode()
        sock = self.idle.pop() if self.idle else socket.create_connection(self.address, timeout=60)
        sock.sendall((self.head % len(body)).encode() + body)
        received = b""
        while b"\r\n\r\n" not in received:
            received += more(sock)
        head, rest = received.split(b"\r\n\r\n", 1)
        return sock, head, rest

    def complete(self, messages):
        """The whole reply to `messages`."""
        sock, head, body = self.ask(messages, stream=False)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        while len(body) < length:
            body += more(sock)
        self.idle.append(sock)
        return json.loads(body)["choices"][0]["message"]["content"]

    def events(self, messages, pieces):
        """Each piece of the reply (also added to `pieces`) as an event of /chat/stream, as the model sends it."""
        sock, _, pending = self.ask(messages, stream=True)
        while True:
            start = pending.find(b"data: ")
            end = pending.find(b"\n\n", start)
            if start < 0 or end < 0:
                pending += more(sock)
                continue
            event, pending = pending[start + 6:end], pending[end + 2:]
            if event == b"[DONE]":
                break
            choices = json.loads(event)["choices"]
            content = choices[0]["delta"].get("content") if choices else None
            if content:
                pieces.append(content)
                yield b'data: {"content": %s, "is_final": false, "metrics": null}\n\n' % json.dumps(content).encode()
        while not pending.endswith(END):
            pending += more(sock)
        self.idle.append(sock)


def more(sock):
    """The next bytes from the model; EOFError if it closed the connection."""
    received = sock.recv(65536)
    if not received:
        raise EOFError("the model closed the connection")
    return received


class Stores:
    """The conversation's recent messages in Redis, every message in PostgreSQL (floormessage, as chat_app.py
    makes it)."""

    def __init__(self, redis_url, database_url):
        """Where the stores are."""
        self.cache = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
            redis_url, max_connections=REDIS_CONNECTIONS, timeout=10))
        self.database_url = database_url
        self.idle = []
        self.places = BoundedSemaphore(POOL_SIZE)

    def recent(self, key):
        """The recent messages kept under `key`."""
        return [json.loads(item) for item in self.cache.lrange(key, -RECENT, -1)]

    def keep(self, key, conversation_id, message, reply):
        """Both messages into Redis, then into the database."""
        pair = [json.dumps({"role": "user", "content": message}), json.dumps({"role": "assistant", "content": reply})]
        with self.cache.pipeline(transaction=False) as pipe:
            pipe.rpush(key, *pair)
            pipe.ltrim(key, -RECENT, -1)
            pipe.execute()
        with self.places:
            connection = self.idle.pop() if self.idle else self.connect()
            with connection.cursor() as cursor:  # one statement, its own transaction: one round trip
                cursor.execute("INSERT INTO floormessage (conversation_id, role, content, created_at) "
                               "VALUES (%s, 'user', %s, now()), (%s, 'assistant', %s, now())",
                               (conversation_id, message, conversation_id, reply))
            self.idle.append(connection)

    def connect(self):
        """A new database connection in autocommit (psycopg2 would send BEGIN as a round trip of its own)."""
        connection = psycopg2.connect(self.database_url)
        connection.autocommit = True
        return connection


def create_app():
    """The WSGI function."""
    secret = os.environ["JWT_SECRET_KEY"]
    model = Model(os.environ["LLM_BASE_URL"], os.environ["LLM_MODEL"])
    stores = Stores(os.environ["REDIS_URL"], os.environ["DATABASE_URL"])

    def streamed(key, conversation_id, message, messages):
        """The turn's events, then (its reply kept) the final one."""
        pieces = []
        yield from model.events(messages, pieces)
        stores.keep(key, conversation_id, message, "".join(pieces))
        yield FINAL

    def app(environ, start_response):
        """/status, /chat/run and /chat/stream."""
        path = environ["PATH_INFO"]
        if path == "/status":
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(STATUS)))])
            return [STATUS]
        user = jwt.decode(environ["HTTP_AUTHORIZATION"].removeprefix("Bearer "), secret, algorithms=["HS256"])["sub"]
        body = json.loads(environ["wsgi.input"].read())
        message, conversation_id = body["message"], body["conversation_id"]
        key = f"floor:{user}:{conversation_id}"
        messages = stores.recent(key) + [{"role": "user", "content": message}]
        if path == "/chat/stream":
            start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])
            return streamed(key, conversation_id, message, messages)
        reply = model.complete(messages)
        stores.keep(key, conversation_id, message, reply)
        answer = json.dumps({"response": reply, "conversation_id": conversation_id}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(answer)))])
        return [answer]

    return app
