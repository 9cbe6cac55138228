"""Fixtures: real PostgreSQL and Redis, a fake OpenAI-compatible model over HTTP, the app and gunicorn."""

import signal
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
import redis

import models
from chat_app import create_app
from llm import OpenAIChatModel
from tests.fake_llm import FakeLLM
from tests.faults import RedisServer, TcpProxy
from tests.helpers import (MODEL_API_KEY, PHASE_REPORTS, POSTGRES_URL, REDIS_URL, SECRET, Service, reset_database,
                           service_missing)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test (phase_failed); a failed one carries every service's log."""
    report = yield
    item.stash.setdefault(PHASE_REPORTS, {})[report.when] = report
    if report.failed:
        for service in getattr(item, "services", []):
            report.sections.append((f"gunicorn log of {service.url}", service.output()[-20000:]))
    return report


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


@pytest.fixture
def private_redis():
    """A redis-server of this test's own, on a free port (to stop, hang or empty without touching the shared one)."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def model(llm):
    """A client of the fake model with a one-second timeout."""
    return OpenAIChatModel(llm.url, MODEL_API_KEY, "fake-model", timeout=1)


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
def make_pg_app(make_app, postgres_url, redis_client):
    """Build apps on PostgreSQL and the emptied Redis; settings override these and the test defaults."""
    return lambda **settings: make_app(**{"DATABASE_URL": postgres_url, "REDIS_URL": REDIS_URL, **settings})


@pytest.fixture
def pg_app(make_pg_app):
    """The app on PostgreSQL and Redis only (for behaviour that does not depend on the backend)."""
    return make_pg_app()


@pytest.fixture
def client(app):
    """A test client of the app on each backend."""
    return app.test_client()


@pytest.fixture
def pg_client(pg_app):
    """A test client of the app on PostgreSQL and Redis."""
    return pg_app.test_client()


@pytest.fixture
def start_service(request, llm, postgres, redis_client):
    """Start services on PostgreSQL, Redis and the fake model; settings override the defaults."""
    started = request.node.services = []

    def start(workers=1, **settings):
        """A running service with `settings` in its environment."""
        env = {"APP_ENV": "production", "JWT_SECRET_KEY": SECRET, "DATABASE_URL": POSTGRES_URL,
               "REDIS_URL": REDIS_URL, "LLM_BASE_URL": llm.url, "LLM_MODEL": "fake-model",
               "LLM_TIMEOUT_SECONDS": "3", "SSE_HEARTBEAT_SECONDS": "10", "LOG_LEVEL": "info",
               # A stream ends when its client leaves unless a test gives a grace to resume in
               # (tests/test_resume.py does; the default of 20 s is for people, not for tests).
               "STREAM_RESUME_GRACE_SECONDS": "0"}
        env.update({key: str(value) for key, value in settings.items()})
        service = Service(env, workers)
        started.append(service)
        return service.start()

    yield start
    for service in started:
        # Nothing is checked after the test, so no graceful stop: SIGTERM would wait out the
        # gevent worker's one-second loop, SIGQUIT ends gunicorn at once.
        service.stop(signal.SIGQUIT, timeout=10)


@pytest.fixture
def service(start_service):
    """One gunicorn + gevent service on PostgreSQL, Redis and the fake model."""
    return start_service()


@pytest.fixture
def pg_proxy(postgres_url):
    """A TCP proxy in front of the test PostgreSQL, owned by this test."""
    parts = urlsplit(postgres_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
    yield proxy
    proxy.stop()
