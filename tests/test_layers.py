"""What each layer promises the one above it: the database's failures, its one transaction, the caller's token."""

import pytest
from flask import g
from flask_jwt_extended import get_jwt

import auth
import models
from tests.helpers import bearer


def test_save_turn_refuses_to_run_inside_another_transaction(app):
    """save_turn runs its own transaction: nested in peewee's, it would end the outer one early."""
    with models.db.connection_context():
        with pytest.raises(RuntimeError, match="cannot be nested"):
            with models.db.atomic():
                models.save_turn(conversation_id="c1", owner="alice", message="hi", reply="hello",
                                 status="complete")
        assert models.Message.select().count() == 0


def test_a_database_failure_is_database_unavailable(tmp_path):
    """Any failure of the database reaches the layer above as DatabaseUnavailable, nothing else."""
    models.open_database(f"sqlite:///{tmp_path / 'missing' / 'dir' / 'chat.db'}", 1, 1)
    (tmp_path / "missing" / "dir").rmdir()
    with pytest.raises(models.DatabaseUnavailable):
        with models.connection():
            models.Conversation.state_of("c1")


def test_retried_once_retries_only_a_database_failure(postgres):
    """A failure of anything but the database is not retried."""
    calls = []

    def read():
        """Fail as a bug would."""
        calls.append(1)
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        models.retried_once(read)
    assert len(calls) == 1


def test_a_kept_token_leaves_the_same_jwt_context_as_a_checked_one(pg_app):
    """get_jwt() sees the token's claims whether it was checked now or kept from before."""
    headers = bearer("alice", role="tester")
    seen = []
    for _ in range(2):  # the second request is answered from the verified tokens
        with pg_app.test_request_context("/chat/run", method="POST", headers=headers):
            auth.authenticate()
            seen.append((g.user, get_jwt()["sub"], get_jwt()["role"]))
    assert seen == [("alice", "alice", "tester")] * 2


def test_each_request_is_counted_once_for_the_rate_limit(make_pg_app):
    """The rate limit counts a request once, however many parts of it need the user."""
    app = make_pg_app(REDIS_URL=None, RATE_LIMIT_PER_MINUTE=3)
    client = app.test_client()
    statuses = [client.get("/conversations", headers=bearer("alice")).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
