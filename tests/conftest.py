"""Fixtures: real PostgreSQL and Redis, a fake OpenAI-compatible model over HTTP, the app and gunicorn."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlsplit, urlunsplit

import jwt
import psycopg2
import pytest
import redis
import requests

import models
from chat_app import create_app
from tests.fake_llm import FakeLLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_CI = os.environ.get("CI", "").lower() == "true"
POSTGRES_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/chat_test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
SECRET = "test-secret-that-is-long-enough-for-hs256-0123456789"


def service_missing(name, error):
    """Fail in CI, skip elsewhere: a test that needs a service never passes without it."""
    message = f"{name} is not reachable: {error}"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


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


def assert_error(response, status, code):
    """The response is the one error shape with `status` and `code`, leaking nothing."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    body = response.get_json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    text = response.get_data(as_text=True)
    assert "Traceback" not in text
    assert SECRET not in text


@pytest.fixture(scope="session")
def postgres_url():
    """The URL of a test database on the real PostgreSQL, created if missing."""
    parts = urlsplit(POSTGRES_URL)
    name = parts.path.lstrip("/")
    try:
        admin = psycopg2.connect(urlunsplit(parts._replace(path="/postgres")), connect_timeout=3)
    except psycopg2.OperationalError as exc:
        service_missing("PostgreSQL", exc)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if cursor.fetchone() is None:
            cursor.execute(f'CREATE DATABASE "{name}"')
    admin.close()
    return POSTGRES_URL


@pytest.fixture(scope="session")
def redis_url():
    """The URL of a test database on the real Redis."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except redis.RedisError as exc:
        service_missing("Redis", exc)
    return REDIS_URL


@pytest.fixture
def redis_client(redis_url):
    """A client of the test Redis database, emptied before the test."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.close()


def stored_messages(conversation_id):
    """The (role, content, status) of each message the database keeps for a conversation, oldest first."""
    with models.db.connection_context():
        query = (models.Message.select().where(models.Message.conversation == conversation_id)
                 .order_by(models.Message.id))
        return [(m.role, m.content, m.status) for m in query]


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


@pytest.fixture
def postgres(postgres_url):
    """The test PostgreSQL database, with empty tables, bound to the models."""
    database = reset_database(postgres_url)
    yield database
    database.close_all()


@pytest.fixture(scope="session")
def llm_server():
    """One fake OpenAI-compatible server on loopback for the whole run."""
    with FakeLLM() as server:
        yield server


@pytest.fixture
def llm(llm_server):
    """The fake model, with no scripts and no recorded requests."""
    llm_server.reset()
    yield llm_server
    llm_server.release()


@pytest.fixture(params=["postgres+redis", "sqlite+memory"])
def backend(request, tmp_path):
    """Database and cache settings: real PostgreSQL + Redis, or a SQLite file + the in-process cache."""
    if request.param == "postgres+redis":
        postgres_url = request.getfixturevalue("postgres_url")
        request.getfixturevalue("redis_client")
        return {"DATABASE_URL": postgres_url, "REDIS_URL": REDIS_URL}
    return {"DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}", "REDIS_URL": None}


@pytest.fixture
def make_app(llm):
    """Build apps on the fake model with empty tables; settings override the test defaults."""
    built = []

    def make(empty=True, **settings):
        """An app with `settings` over the test defaults, on emptied tables unless `empty` is False."""
        config = {"TESTING": True, "JWT_SECRET_KEY": SECRET, "LLM_BASE_URL": llm.url,
                  "LLM_MODEL": "fake-model", "LLM_TIMEOUT_SECONDS": 2, **settings}
        if empty:
            reset_database(config["DATABASE_URL"])
        app = create_app(config)
        built.append(app)
        return app

    yield make
    for _ in built:
        models.db.obj.close_all()


@pytest.fixture
def app(make_app, backend):
    """The app on each backend."""
    return make_app(**backend)


@pytest.fixture
def pg_app(make_app, postgres_url, redis_client):
    """The app on PostgreSQL and Redis only (for behaviour that does not depend on the backend)."""
    return make_app(DATABASE_URL=postgres_url, REDIS_URL=REDIS_URL)


@pytest.fixture
def client(app):
    """A test client of the app on each backend."""
    return app.test_client()


@pytest.fixture
def pg_client(pg_app):
    """A test client of the app on PostgreSQL and Redis."""
    return pg_app.test_client()


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
        try:
            return requests.get(self.url + "/status", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def output(self):
        """What gunicorn logged so far."""
        with open(self.log.name, errors="replace") as log:
            return log.read()

    def stop(self, sig=signal.SIGTERM, timeout=30):
        """Stop gunicorn and wait for it to exit."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def post(self, path, body, user="alice", **kwargs):
        """POST JSON to the service as `user`, on a connection closed after the answer.

        An idle keep-alive connection left open by a test would hold the worker at shutdown
        (gunicorn's gevent worker waits for every open connection until GRACEFUL_TIMEOUT).
        """
        kwargs.setdefault("timeout", 30)
        headers = {**bearer(user), "Connection": "close"}
        return requests.post(self.url + path, json=body, headers=headers, **kwargs)

    def stream(self, message, conversation_id, user="alice"):
        """Start a streamed turn and return the open response."""
        return self.post("/chat/stream", {"message": message, "conversation_id": conversation_id},
                         user=user, stream=True, timeout=(5, 20))


@pytest.fixture
def start_service(llm, postgres, redis_client):
    """Start services on PostgreSQL, Redis and the fake model; settings override the defaults."""
    started = []

    def start(workers=1, **settings):
        """A running service with `settings` in its environment."""
        env = {"APP_ENV": "production", "JWT_SECRET_KEY": SECRET, "DATABASE_URL": POSTGRES_URL,
               "REDIS_URL": REDIS_URL, "LLM_BASE_URL": llm.url, "LLM_MODEL": "fake-model",
               "LLM_TIMEOUT_SECONDS": "3", "SSE_HEARTBEAT_SECONDS": "10", "LOG_LEVEL": "info"}
        env.update({key: str(value) for key, value in settings.items()})
        service = Service(env, workers)
        started.append(service)
        return service.start()

    yield start
    for service in started:
        service.stop(timeout=10)


@pytest.fixture
def service(start_service):
    """One gunicorn + gevent service on PostgreSQL, Redis and the fake model."""
    return start_service()


PHASE_REPORTS = pytest.StashKey[dict]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test, so a fixture can tell at teardown whether it failed."""
    report = yield
    item.stash.setdefault(PHASE_REPORTS, {})[report.when] = report
    return report


def phase_failed(request):
    """Whether the test of `request` failed (for a fixture's teardown)."""
    reports = request.node.stash.get(PHASE_REPORTS, {})
    return any(report.failed for report in reports.values())
