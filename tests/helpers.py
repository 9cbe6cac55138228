"""What the tests share: settings, tokens, the one error shape, what the stores hold, the service under gunicorn."""

import base64
import collections
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import urlsplit

import jwt
import psycopg2
import pytest
import redis
import requests
from flask.cli import FlaskGroup

import cache
import coordination
import models
from redis_link import scope
from tests.fake_llm import Script
from tests.sse_client import PING, data_events, events, events_with_ids, next_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_CI = os.environ.get("CI", "").lower() == "true"
POSTGRES_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/chat_test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
# The benchmark's own databases on the same servers (it drops its tables and empties its Redis database).
BENCH_DATABASE_URL = os.environ.get("TEST_BENCH_DATABASE_URL", POSTGRES_URL.rsplit("/", 1)[0] + "/chat_bench")
BENCH_REDIS_URL = os.environ.get("TEST_BENCH_REDIS_URL", REDIS_URL.rsplit("/", 1)[0] + "/9")
SECRET = "test-secret-that-is-long-enough-for-hs256-0123456789"
# The key the `model` fixture's client sends the fake model.
MODEL_API_KEY = "sk-secret-key-000000"
SLOW_REPLY = Script(chunks=["partial ", "rest of it"], chunk_delay=30)


def service_missing(name, error):
    """Fail in CI, skip elsewhere: a test that needs a service never passes without it."""
    message = f"{name} is not reachable: {error}"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


PHASE_REPORTS = pytest.StashKey[dict]()


def phase_failed(request):
    """Whether the test of `request` failed (for a fixture's teardown)."""
    reports = request.node.stash.get(PHASE_REPORTS, {})
    return any(report.failed for report in reports.values())


def free_port():
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition, timeout=20, interval=0.05):
    """Wait until `condition()` is true; False if it never was within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False


def answers(url):
    """True if `url` answers 200."""
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


# Tokens and the one error shape

def token(sub="alice", secret=SECRET, algorithm="HS256", lifetime=3600, **claims):
    """A bearer token minted the way any other system with the secret would."""
    now = int(time.time())
    payload = {"iat": now, "exp": now + lifetime, **claims}
    if sub is not None:
        payload["sub"] = sub
    return jwt.encode(payload, secret, algorithm=algorithm)


def bearer(sub="alice", **claims):
    """Authorization headers for `sub`."""
    return {"Authorization": f"Bearer {token(sub, **claims)}"}


def b64url(data):
    """Unpadded base64url of bytes, or of a dict as JSON (a token's parts as any issuer makes them)."""
    if isinstance(data, dict):
        data = json.dumps(data).encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def cursor_of(position):
    """A cursor made the way the service makes them, around any `position` (JSON-encoded unless bytes)."""
    raw = position if isinstance(position, bytes) else json.dumps(position).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def claims_of(printed):
    """The verified claims of a token a command printed."""
    return jwt.decode(printed.strip(), SECRET, algorithms=["HS256"])


def assert_error(response, status, code, mentions=None):
    """The response (Flask's or requests') is the one JSON error shape with `status` and `code`, leaking nothing."""
    text = response.text if isinstance(response, requests.Response) else response.get_data(as_text=True)
    assert response.status_code == status, text
    assert response.headers["Content-Type"] == "application/json"
    body = json.loads(text)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if mentions is not None:
        assert mentions in body["error"]["message"], body
    assert "Traceback" not in text
    assert SECRET not in text


# What the database and the cache hold

FRESH_SCHEMA = set()


def reset_database(url):
    """Bind the models to `url` with empty tables (recreated once a run, so the schema is current)."""
    database = models.open_database(url, 4, 5)
    with database.connection_context():
        if url not in FRESH_SCHEMA:
            database.drop_tables([models.Message, models.Conversation], safe=True)
            FRESH_SCHEMA.add(url)
        models.create_tables()
        models.Message.delete().execute()
        models.Conversation.delete().execute()
    return database


def message_rows(conversation_id, owner="alice"):
    """Every column of each message the database keeps for the owner's conversation, as dicts, oldest first."""
    with models.db.connection_context():
        conversation = models.Conversation.owned(owner, conversation_id)
        if conversation is None:
            return []
        query = (models.Message.select().where(models.Message.conversation == conversation.key)
                 .order_by(models.Message.id))
        return list(query.dicts())


def stored_messages(conversation_id, owner="alice"):
    """The (role, content, status) of each message the database keeps for the owner's conversation, oldest first."""
    return [(row["role"], row["content"], row["status"]) for row in message_rows(conversation_id, owner)]


def complete(*pairs):
    """The stored form of finished turns: (user message, reply) pairs, each saved as complete."""
    rows = []
    for message, reply in pairs:
        rows += [("user", message, "complete"), ("assistant", reply, "complete")]
    return rows


def message_counts(owner=None):
    """{conversation id: how many messages it has} of every conversation the database holds (the owner's, if given)."""
    with models.db.connection_context():
        query = models.Conversation.select()
        if owner is not None:
            query = query.where(models.Conversation.owner == owner)
        return {c.id: c.messages.count() for c in query}


def stored_counts():
    """How many (conversations, messages) the database holds."""
    with models.db.connection_context():
        return models.Conversation.select().count(), models.Message.select().count()


def stored_conversation(conversation_id, owner="alice"):
    """The database's row of the owner's conversation."""
    with models.db.connection_context():
        return models.Conversation.owned(owner, conversation_id)


def conversation_exists(conversation_id, owner="alice"):
    """Whether the database has a row for the owner's conversation."""
    return stored_conversation(conversation_id, owner) is not None


def cache_key(conversation_id, owner="alice"):
    """The Redis key of the owner's cached conversation."""
    return cache.KEY.format(scope(owner, conversation_id))


def lease_key(conversation_id, owner="alice"):
    """The Redis key of the lease on the owner's conversation."""
    return coordination.LOCK_KEY.format(scope(owner, conversation_id))


def cached_messages(redis_client, conversation_id, owner="alice"):
    """The (version, messages) Redis holds for the owner's conversation, or None if it holds nothing."""
    raw = redis_client.get(cache_key(conversation_id, owner))
    return None if raw is None else cache.decode(raw)


def cached_contents(redis_client, conversation_id, owner="alice"):
    """The contents of the messages Redis holds for the owner's conversation (None if it holds nothing)."""
    cached = cached_messages(redis_client, conversation_id, owner)
    return None if cached is None else contents(cached[1])


def database_backends(postgres_url, waiting_on_a_lock=False):
    """How many backends serve the test database (only those waiting on a lock, if asked)."""
    server, name = postgres_url.rsplit("/", 1)
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
    if waiting_on_a_lock:
        query += " AND wait_event_type = 'Lock'"
    admin = psycopg2.connect(server + "/postgres")
    try:
        with admin.cursor() as cursor:
            cursor.execute(query, (name,))
            return cursor.fetchone()[0]
    finally:
        admin.close()


@contextlib.contextmanager
def locked_table(postgres_url, table):
    """Hold an exclusive lock on `table` from a connection of the test's own until the block ends."""
    locker = psycopg2.connect(postgres_url)
    try:
        with locker.cursor() as cursor:
            cursor.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            yield
        locker.commit()
    finally:
        locker.close()


def lock_waiters(postgres_url):
    """How many backends of the test database wait on a lock."""
    return database_backends(postgres_url, waiting_on_a_lock=True)


def listening_for_stops(redis_client):
    """Whether some process subscribes to the stop channel."""
    channel = coordination.STOP_CHANNEL.format(redis_client.connection_pool.connection_kwargs.get("db", 0))
    return redis_client.pubsub_numsub(channel)[0][1] >= 1


# What the model was sent

def contents(messages):
    """The contents of chat messages (dicts with a "content"), in order."""
    return [m["content"] for m in messages]


def sent_to_model(llm):
    """The messages of the fake model's latest request."""
    return llm.requests[-1]["json"]["messages"]


def seen_by_model(llm):
    """The contents of the messages of the fake model's latest request."""
    return contents(sent_to_model(llm))


# Turns

def turn_body(message, conversation_id=None):
    """A chat request body, naming the conversation if one is given."""
    return {"message": message} if conversation_id is None else {"message": message,
                                                                 "conversation_id": conversation_id}


def run(client, message, conversation_id=None, user="alice"):
    """POST /chat/run through a Flask test client as `user`, asserting 200; the JSON reply."""
    response = client.post("/chat/run", json=turn_body(message, conversation_id), headers=bearer(user))
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def flask_cli(app, monkeypatch, *args):
    """Run `flask --app chat_app ARGS` in process against `app` and return the click result."""
    monkeypatch.setenv("FLASK_RUN_FROM_CLI", "true")  # FlaskGroup sets it; monkeypatch restores it
    group = FlaskGroup(create_app=lambda: app, load_dotenv=False)
    return app.test_cli_runner().invoke(group, list(args))


def descendants(pid):
    """The pids of a process's children, grandchildren and so on."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Service:
    """The service running under gunicorn with the gevent worker, in its own process."""

    def __init__(self, env, workers=1):
        """Configure, not yet started."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PORT": str(self.port), "WEB_CONCURRENCY": str(workers), **env}
        self.log = tempfile.NamedTemporaryFile(prefix="gunicorn-", suffix=".log", delete=False)
        self.process = None

    def start(self):
        """Start gunicorn from the Procfile's command and wait until /status answers."""
        command = [os.path.join(os.path.dirname(sys.executable), "gunicorn"),
                   "--config", "gunicorn.conf.py", "chat_app:create_app()"]
        self.process = subprocess.Popen(command, cwd=ROOT, env=self.env,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        if not wait_until(self._answers, timeout=30):
            self.stop()
            raise RuntimeError(f"gunicorn did not start:\n{self.output()}")
        return self

    def _answers(self):
        """True once /status answers; raise if gunicorn exited."""
        if self.process.poll() is not None:
            raise RuntimeError(f"gunicorn exited:\n{self.output()}")
        return answers(self.url + "/status")

    def output(self):
        """What gunicorn logged so far."""
        with open(self.log.name, errors="replace") as log:
            return log.read()

    def messages(self, beginning=""):
        """The messages of the JSON log lines the service wrote so far that begin with `beginning`, in order."""
        found = []
        for raw in self.output().splitlines():
            try:
                message = json.loads(raw).get("message")
            except (ValueError, AttributeError):
                continue
            if isinstance(message, str) and message.startswith(beginning):
                found.append(message)
        return found

    def stop(self, sig=signal.SIGTERM, timeout=30):
        """Stop gunicorn and wait for it to exit."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def request(self, method, path, body=None, user="alice", headers=None, **kwargs):
        """A request with a JSON body as `user` (no token if None), on a connection closed after the answer.

        An idle keep-alive connection left open by a test would hold the worker at shutdown
        (gunicorn's gevent worker waits for every open connection until GRACEFUL_TIMEOUT).
        """
        kwargs.setdefault("timeout", 30)
        headers = {**(bearer(user) if user else {}), "Connection": "close", **(headers or {})}
        return requests.request(method, self.url + path, json=body, headers=headers, **kwargs)

    def post(self, path, body, user="alice", **kwargs):
        """POST JSON to the service as `user`."""
        return self.request("POST", path, body, user, **kwargs)

    def run(self, message, conversation_id=None, user="alice", **kwargs):
        """A whole /chat/run turn; the response."""
        return self.post("/chat/run", turn_body(message, conversation_id), user, **kwargs)

    def stream(self, message, conversation_id=None, user="alice", **kwargs):
        """Start a /chat/stream turn; the open response."""
        kwargs.setdefault("timeout", (5, 20))
        return self.post("/chat/stream", turn_body(message, conversation_id), user, stream=True, **kwargs)

    def turn(self, path, message, conversation_id):
        """A turn on `path` ("run" or "stream"), read to the end."""
        if path == "run":
            return self.run(message, conversation_id)
        response = self.stream(message, conversation_id)
        response.content  # noqa: B018 - read it all, so the turn is over when this returns
        return response

    def status(self):
        """The detailed /status document, asked with a token (it must answer 200 whatever is down)."""
        response = requests.get(self.url + "/status", headers={**bearer(), "Connection": "close"}, timeout=10)
        assert response.status_code == 200
        return response.json()

    def status_once(self, condition, timeout=5):
        """The first /status document for which `condition` holds (the service checks its parts once a second)."""
        found = []
        wait_until(lambda: condition(found.append(self.status()) or found[-1]), timeout=timeout, interval=0.2)
        return found[-1]


def resume(service, conversation_id, last_event_id=None, user="alice"):
    """GET /chat/stream/{conversation_id}, with Last-Event-ID if given; the open response."""
    headers = {**bearer(user), "Connection": "close"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    return requests.get(f"{service.url}/chat/stream/{conversation_id}", headers=headers, stream=True,
                        timeout=(5, 30))


def read_events(response, stop_after=None):
    """The (id, payload) events of a stream, pings left out; only the first `stop_after` if given."""
    return take_events(events_with_ids(response), stop_after)


def take_events(received, stop_after=None):
    """The next (id, payload) events of an iterator of them, pings left out; only `stop_after` of them if given."""
    got = []
    for event_id, payload in received:
        if payload == PING:
            continue
        got.append((event_id, payload))
        if stop_after is not None and len(got) == stop_after:
            break
    return got


# %(p)s is the worker's pid: which worker answered each request.
ACCESS_LOG_WITH_PID = "--access-logfile - --access-logformat '%(p)s %(s)s \"%(r)s\"'"
ACCESS_LINE = re.compile(r"<(\d+)> (\d{3}) \"POST /chat/(run|stream) HTTP/1.1\"")


def busy_answers_by_worker(service):
    """{pid: [status, ...]} of the chat requests in the access log of a service started with ACCESS_LOG_WITH_PID."""
    answers = {}
    for pid, status, _ in ACCESS_LINE.findall(service.output()):
        answers.setdefault(pid, []).append(int(status))
    return answers


class Holder:
    """A turn that holds a conversation until the fake model is released."""

    def __init__(self, service, llm, path, conversation_id, message="first"):
        """Start the turn and return once the model has its request (so the lock is held)."""
        self.path = path
        self.result = []
        requests_before = len(llm.requests)
        if path == "stream":
            # The first chunk comes at once (so the 200 and headers are in), the second only on release.
            llm.script(Script(chunks=["held ", "reply"], chunk_delay=60))
            self.response = service.stream(message, conversation_id)
            assert self.response.status_code == 200
        else:
            llm.script(Script(reply="held reply", header_delay=60))
            self.thread = threading.Thread(
                target=lambda: self.result.append(service.run(message, conversation_id)))
            self.thread.start()
        assert llm.wait_for_requests(requests_before + 1)

    def finish(self):
        """After llm.release(): the turn's outcome, checked to be a success."""
        if self.path == "stream":
            received = data_events(self.response)
            assert "error" not in received[-1], received[-1]["error"]
            return "".join(e["content"] for e in received)
        self.thread.join(20)
        assert self.result and self.result[0].status_code == 200, self.result
        return self.result[0].json()["response"]


@contextlib.contextmanager
def slow_stream(service, llm, conversation_id, message="second", user="alice", **kwargs):
    """A stream whose model sends "partial " and then waits for llm.release(): its events after that chunk."""
    llm.script(SLOW_REPLY)
    with service.stream(message, conversation_id, user, **kwargs) as response:
        assert response.status_code == 200, response.text
        received = events(response)
        assert next_data(received)["content"] == "partial "
        yield received


def assert_next_turn_sees(service, llm, conversation_id, history):
    """The next streamed turn works (the conversation was let go) and the model gets `history` first."""
    requests_before = len(llm.requests)
    llm.script(Script(reply="welcome back"))
    response = service.stream("are you there?", conversation_id)
    assert response.status_code == 200, response.text
    received = data_events(response)
    assert "error" not in received[-1], received[-1]["error"]
    assert "".join(e["content"] for e in received[:-1]) == "welcome back"
    assert len(llm.requests) == requests_before + 1
    assert seen_by_model(llm) == history + ["are you there?"]
    assert stored_messages(conversation_id)[-2:] == complete(("are you there?", "welcome back"))


def through(proxy):
    """The test database's URL, reached through the proxy."""
    parts = urlsplit(POSTGRES_URL)
    user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return parts._replace(netloc=f"{user}127.0.0.1:{proxy.port}").geturl()


def request_lines(service):
    """The JSON lines the service wrote on the chat.requests logger, in order."""
    lines = []
    for raw in service.output().splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and line.get("logger") == "chat.requests":
            lines.append(line)
    return lines


def lines_for(service, request_id):
    """The request-log lines carrying `request_id`."""
    return [line for line in request_lines(service) if line.get("request_id") == request_id]


def kill_hard(service):
    """SIGKILL the service's master and workers at once, as a lost host or the OOM killer would."""
    for pid in [service.process.pid, *descendants(service.process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    service.process.wait(10)


@contextlib.contextmanager
def commands_sent(redis_url):
    """The commands sent to the Redis database of `redis_url` during the block, counted by name once it ends.

    MONITOR sees every client of the server; the database number tells this suite's commands from those of
    another suite on the same server (CI runs two at once), where the server's own statistics would not.
    """
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    database = client.connection_pool.connection_kwargs.get("db", 0)
    marker = f"end-of-block-{os.getpid()}-{time.monotonic_ns()}"
    counts, watching = collections.Counter(), threading.Event()

    def watch():
        """Count what the server is sent until the marker comes."""
        with client.monitor() as monitor:
            watching.set()
            for command in monitor.listen():
                if marker in command["command"]:
                    return
                if int(command["db"]) == database:
                    counts[command["command"].split(" ", 1)[0].upper()] += 1

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert watching.wait(10)
    try:
        yield counts
    finally:
        client.echo(marker)
        watcher.join(10)
        client.close()
    assert not watcher.is_alive(), "MONITOR never saw the end of the block"
