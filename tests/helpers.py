"""What the tests share: the test settings, tokens, the one error shape, reads of the database, the service under gunicorn."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jwt
import pytest
import requests

import models

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