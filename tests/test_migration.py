"""init-db moves a database of version 0.4 (one global namespace of conversation ids) to per-user ids."""

import datetime
import subprocess
import sys

import pytest

import models
from tests.helpers import ROOT, SECRET

# The tables 0.4 created, as its peewee models wrote them (TIMESTAMP is DATETIME on SQLite).
OLD_SCHEMA = [
    'CREATE TABLE "conversation" ("id" VARCHAR(128) NOT NULL PRIMARY KEY, "owner" VARCHAR(255) NOT NULL, '
    '"title" VARCHAR(200) NOT NULL, "created_at" TIMESTAMP NOT NULL, "updated_at" TIMESTAMP NOT NULL, '
    '"version" VARCHAR(32) NOT NULL)',
    'CREATE INDEX "conversation_owner" ON "conversation" ("owner")',
    'CREATE INDEX "conversation_owner_updated_at" ON "conversation" ("owner", "updated_at")',
    'CREATE TABLE "message" ("id" {serial} NOT NULL PRIMARY KEY, "conversation_id" VARCHAR(128) NOT NULL, '
    '"role" VARCHAR(16) NOT NULL, "content" TEXT NOT NULL, "status" VARCHAR(16) NOT NULL, "token_count" INTEGER, '
    '"prompt_tokens" INTEGER, "created_at" TIMESTAMP NOT NULL, FOREIGN KEY ("conversation_id") '
    'REFERENCES "conversation" ("id") ON DELETE CASCADE)',
    'CREATE INDEX "message_conversation_id" ON "message" ("conversation_id")',
    'CREATE INDEX "message_conversation_id_id" ON "message" ("conversation_id", "id")',
]
WHEN = datetime.datetime(2026, 11, 1, 12, 0, 0)


@pytest.fixture(params=["postgresql", "sqlite"])
def old_database(request, tmp_path):
    """A database as 0.4 left it: alice's demo-1 with two messages, bob's b-1 with four."""
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
        database = models.open_database(url, 2, 5)
        with database.connection_context():
            database.execute_sql("DROP TABLE IF EXISTS chat_message, chat_conversation, message, conversation CASCADE")
    else:
        url = f"sqlite:///{tmp_path / 'old.db'}"
        database = models.open_database(url, 2, 5)
    serial = "SERIAL" if request.param == "postgresql" else "INTEGER"
    with database.connection_context():
        for statement in OLD_SCHEMA:
            database.execute_sql(statement.format(serial=serial))
        for conversation_id, owner in (("demo-1", "alice"), ("b-1", "bob")):
            database.execute_sql("INSERT INTO conversation VALUES (%s, %s, %s, %s, %s, %s)".replace("%s", database.param),
                                 (conversation_id, owner, f"{owner}'s", WHEN, WHEN, "v1"))
        rows = [(1, "demo-1", "user", "hello"), (2, "demo-1", "assistant", "hi alice"),
                (7, "b-1", "user", "one"), (8, "b-1", "assistant", "two"),
                (9, "b-1", "user", "three"), (12, "b-1", "assistant", "four")]
        for message_id, conversation_id, role, content in rows:
            database.execute_sql(
                "INSERT INTO message VALUES (%s, %s, %s, %s, 'complete', 1, NULL, %s)".replace("%s", database.param),
                (message_id, conversation_id, role, content, WHEN))
    yield url, database
    with database.connection_context():
        database.drop_tables([models.Message, models.Conversation], safe=True)
    database.close_all()


def init_db(url):
    """Run the release command, `flask --app chat_app init-db`, against `url`."""
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": url, "JWT_SECRET_KEY": SECRET}
    return subprocess.run([sys.executable, "-m", "flask", "--app", "chat_app", "init-db"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def kept(database):
    """(owner, conversation id, title, [(message id, role, content)]) of every conversation, by owner."""
    with database.connection_context():
        return [(c.owner, c.id, c.title,
                 [(m.id, m.role, m.content) for m in c.messages.order_by(models.Message.id)])
                for c in models.Conversation.select().order_by(models.Conversation.owner)]


def test_init_db_moves_every_conversation_and_message_keeping_ids(old_database):
    """Owners, ids, titles, message ids and contents survive the move; the old tables are gone."""
    url, database = old_database
    result = init_db(url)
    assert result.returncode == 0, result.stderr
    assert kept(database) == [
        ("alice", "demo-1", "alice's", [(1, "user", "hello"), (2, "assistant", "hi alice")]),
        ("bob", "b-1", "bob's", [(7, "user", "one"), (8, "assistant", "two"), (9, "user", "three"),
                                  (12, "assistant", "four")])]
    with database.connection_context():
        assert not {"conversation", "message"} & set(database.get_tables())


def test_init_db_is_safe_to_run_again_and_new_messages_number_on(old_database):
    """A second run changes nothing; a new turn's messages get ids after the moved ones."""
    url, database = old_database
    assert init_db(url).returncode == 0
    before = kept(database)
    assert init_db(url).returncode == 0
    assert kept(database) == before
    with database.connection_context():
        models.save_turn(conversation_id="demo-1", owner="bob", message="mine", reply="yours", status="complete")
        bobs = models.Conversation.owned("bob", "demo-1")
        assert [m.id for m in bobs.messages] == [13, 14]
        assert [m.content for m in models.Conversation.owned("alice", "demo-1").messages] == ["hello", "hi alice"]
