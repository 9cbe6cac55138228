"""Peewee models: conversations and their messages, kept for history; the database's failures."""

import contextlib
import datetime
import os
import secrets
from urllib.parse import urlsplit

from peewee import (AutoField, Case, CharField, IntegrityError, DatabaseProxy, DateTimeField, ForeignKeyField,
                    IntegerField, InterfaceError, Model, OperationalError, PeeweeException, PostgresqlDatabase,
                    ProgrammingError, TextField, fn)
from playhouse.db_url import connect, register_database
from playhouse.db_url import schemes as db_url_schemes
from playhouse.migrate import SchemaMigrator, migrate
from playhouse.pool import MaxConnectionsExceeded, PooledDatabase, PooledPostgresqlDatabase

from config import ConfigError
from outages import Outage, Unavailable, database_reason
from patrol import threads_are_greenlets

db = DatabaseProxy()
# Why the database cannot be used, if it cannot: logged once an outage, reported by /status.
outage = Outage("The database")

# What says the database cannot be reached or used now: peewee's OperationalError (refused, cut,
# shutting down, out of connection slots, a statement or lock timeout, SQLite's "database is
# locked"), its InterfaceError (a connection already closed), a pool with no free connection, and
# the socket timeouts of a database that stopped answering (gunicorn.conf.py sets them). Any other
# error (DataError, IntegrityError, ProgrammingError...) is a query the database refused: a bug.
DATABASE_ERRORS = (OperationalError, InterfaceError, MaxConnectionsExceeded, OSError)
# PostgreSQL's code for a table that does not exist: the tables were never made (init-db), which
# SQLite says with an OperationalError ("no such table").
UNDEFINED_TABLE = "42P01"

TITLE_CHARS = 200
OWNER_CHARS = 255
AUTO_TITLE_CHARS = 80


def utcnow():
    """The current time in UTC, without tzinfo (as stored)."""
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def as_datetime(moment):
    """A stored time as a datetime (SQLite may hand back its text)."""
    return datetime.datetime.fromisoformat(moment) if isinstance(moment, str) else moment


def iso(moment):
    """A stored UTC time as ISO 8601 with a Z."""
    return as_datetime(moment).isoformat(timespec="milliseconds") + "Z"


def pooled_url(url):
    """The URL with peewee's pooled flavour of its scheme (`postgres://` -> `postgres+pool://`)."""
    scheme, sep, rest = url.partition("://")
    if "+" in scheme or not sep:
        return url
    return f"{scheme}+pool://{rest}"


def open_database(url, pool_size, pool_timeout):
    """Bind the models to the database at `url` through a bounded connection pool."""
    url = checked(pooled_url(url))
    options = {"max_connections": pool_size, "timeout": pool_timeout, "stale_timeout": 300}
    if url.startswith("sqlite"):
        path = urlsplit(url).path[1:]
        if path and path != ":memory:":
            make_folder_of(path)
        options.update(check_same_thread=False,
                       pragmas={"journal_mode": "wal", "busy_timeout": 5000, "foreign_keys": 1})
    database = connect(url, **options)
    db.initialize(database)
    return database


def checked(url):
    """The pooled DATABASE_URL, if peewee can read it; ConfigError, without repeating it, if not."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in db_url_schemes:
        given = f" (it starts with {scheme.removesuffix('+pool')}://)" if sep else ""
        raise ConfigError(f"DATABASE_URL must be a postgresql:// or sqlite:/// URL{given}")
    try:
        urlsplit(url).port
    except ValueError:
        raise ConfigError("the port in DATABASE_URL must be a number") from None
    return url


def make_folder_of(path):
    """Make the folder of the SQLite file at `path`, if it is missing; ConfigError if it cannot be made."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as exc:
        why = "a file is where the folder would be" if isinstance(exc, FileExistsError) else exc.strerror
        raise ConfigError(f"the folder of DATABASE_URL's SQLite file cannot be created ({why})") from None


class PooledPostgres(PooledPostgresqlDatabase):
    """peewee's pooled PostgreSQL, without its ping before every reuse of a connection.

    The ping is a round trip on every checkout, two a turn. Instead a failed connection
    makes the pool drop all its idle ones (a restart or a cut leaves them all dead), and
    the reads at the start of a turn are retried once (retried_once).
    """

    def _is_closed(self, conn):
        """Closed, as far as the driver knows without a round trip."""
        return bool(conn.closed)

    def connect(self, reuse_if_open=False):
        """Take a connection, waiting at the gate while all are in use (MaxConnectionsExceeded after the timeout).

        peewee's pool makes a waiter wait on a Python condition, on a timer of a second, and try
        again; the gate is a compiled semaphore. The place taken is noted on the thread's
        connection state, so only the close of that connection gives it back.
        """
        if not self.is_closed():
            return super().connect(reuse_if_open)
        gate = self._gate()
        if not gate.acquire(timeout=None if self._wait_timeout == float("inf") else self._wait_timeout):
            raise MaxConnectionsExceeded("Max connections exceeded, timed out attempting to connect.")
        try:
            connected = super(PooledDatabase, self).connect(reuse_if_open)  # past the gate: no wait of peewee's
        except BaseException:
            if self.is_closed():
                gate.release()
            else:  # the connection was made before the failure: its close gives the place back
                self._state.gate = gate
            raise
        self._state.gate = gate
        return connected

    def close(self):
        """Give the connection back, and its place at the gate."""
        try:
            return super().close()
        finally:
            gate = getattr(self._state, "gate", None)
            if gate is not None and self.is_closed():
                self._state.gate = None
                if gate is self._gate(made=False):  # not a place taken in the process this one was forked from
                    gate.release()

    def _gate(self, made=True):
        """The semaphore of the pool's connections in this process, made on first use (after gevent has patched);
        with `made` False, None if this process has not made one."""
        made_in, gate = self.__dict__.get("_gate_of_process", (None, None))
        if made_in == os.getpid():
            return gate
        if not made:
            return None
        with self._pool_lock:  # two threads' first checkouts at once make one gate
            made_in, gate = self.__dict__.get("_gate_of_process", (None, None))
            if made_in != os.getpid():
                gate = gate_of(self._max_connections)
                self._gate_of_process = (os.getpid(), gate)
            return gate


def gate_of(size):
    """A semaphore of `size` places: gevent's own (compiled) under gevent, else the standard library's."""
    if threads_are_greenlets():
        from gevent.lock import BoundedSemaphore
    else:
        from threading import BoundedSemaphore
    return BoundedSemaphore(size)


register_database(PooledPostgres, "postgres+pool", "postgresql+pool")


class DatabaseUnavailable(Unavailable):
    """The database could not be used: down, unreachable, out of connections or too slow; str() says why."""


def cannot_be_used(failure):
    """Whether `failure` says the database cannot be reached or used now (else the query was wrong)."""
    if isinstance(failure, ProgrammingError):
        return getattr(failure.__context__, "pgcode", None) == UNDEFINED_TABLE
    return isinstance(failure, DATABASE_ERRORS)


@contextlib.contextmanager
def connection(retrying=False):
    """A pooled database connection for the block; a database that cannot be used is DatabaseUnavailable.

    The failure begins an outage (logged once, with its reason) unless `retrying`: another try follows.
    Any other error of the database (a query it refused) is raised as it is: a bug, not an outage.
    """
    try:
        with db.connection_context():
            yield
    except (*DATABASE_ERRORS, ProgrammingError) as exc:
        if not cannot_be_used(exc):
            raise
        reason = database_reason(exc, db.obj.connect_params.get("password"))
        if not retrying:
            outage.failed(reason)
        db.close_idle()  # a failed connection means its idle siblings are likely dead too
        raise DatabaseUnavailable(reason) from None
    outage.recovered()


def retried_once(read):
    """Run a database read in its own connection, and once more if the database failed it.

    The first try may have met a connection cut since it was pooled; its failure emptied the
    pool of such connections.
    """
    def attempt(retrying):
        """One try."""
        with connection(retrying):
            return read()

    try:
        return attempt(retrying=True)
    except DatabaseUnavailable:
        return attempt(retrying=False)


def ping():
    """Run the cheapest query there is."""
    db.execute_sql("SELECT 1")


def backend_name():
    """Which database the models are bound to: 'postgresql' or 'sqlite'."""
    return "postgresql" if isinstance(db.obj, PostgresqlDatabase) else "sqlite"


class BaseModel(Model):
    """Base class binding every model to the proxied database."""

    class Meta:
        database = db


class Conversation(BaseModel):
    """A conversation, owned by the user who started it; its id is the user's own name for it.

    Ids are per user: alice's "demo-1" and bob's "demo-1" are two conversations that never meet.
    `key` is the row's own number, which messages refer to.
    """

    key = AutoField()
    id = CharField(max_length=128)
    owner = CharField(max_length=OWNER_CHARS)
    title = CharField(max_length=TITLE_CHARS, default="")
    created_at = DateTimeField(default=utcnow)
    updated_at = DateTimeField(default=utcnow)
    # A new random token for every turn saved (never reused, even after a delete):
    # a cached copy made at another version is stale.
    version = CharField(max_length=32, default="")

    class Meta:
        table_name = "chat_conversation"
        indexes = ((("owner", "id"), True), (("owner", "updated_at"), False))

    @classmethod
    def state_of(cls, owner, conversation_id):
        """The (key, version) of the owner's conversation, or (None, None) if it does not exist."""
        # Written out: it runs before every turn, and peewee's query building costs more than the read.
        row = db.execute_sql(f"SELECT key, version FROM chat_conversation WHERE owner = {db.param} AND id = {db.param}",
                             (owner, conversation_id)).fetchone()
        return row or (None, None)

    @classmethod
    def owned(cls, owner, conversation_id):
        """The owner's conversation of that id, else None."""
        return cls.select().where((cls.owner == owner) & (cls.id == conversation_id)).first()

    @classmethod
    def page_of(cls, owner, limit, after=None):
        """A page of the owner's conversations, newest activity first, with message counts.

        `after` is the (updated_at, id) of the last conversation of the previous page.
        """
        count = (Message.select(fn.COUNT(Message.id)).where(Message.conversation == cls.key))
        query = cls.select(cls, count.alias("message_count")).where(cls.owner == owner)
        if after is not None:
            updated_at, conversation_id = after
            query = query.where((cls.updated_at < updated_at)
                                | ((cls.updated_at == updated_at) & (cls.id < conversation_id)))
        return list(query.order_by(cls.updated_at.desc(), cls.id.desc()).limit(limit))

    @classmethod
    def older_than(cls, cutoff):
        """The (key, owner, id) of conversations with no activity since `cutoff`."""
        return list(cls.select(cls.key, cls.owner, cls.id).where(cls.updated_at < cutoff).tuples())

    @classmethod
    def count_stale(cls, cutoff):
        """(conversations, messages in them) with no activity since `cutoff`."""
        stale = cls.select(cls.key).where(cls.updated_at < cutoff)
        return stale.count(), Message.select().where(Message.conversation.in_(stale)).count()

    @classmethod
    def remove(cls, keys):
        """Delete conversations (by key) and their messages in one transaction; how many were deleted."""
        with db.atomic():
            Message.delete().where(Message.conversation.in_(keys)).execute()
            return cls.delete().where(cls.key.in_(keys)).execute()

    def as_json(self, message_count=None):
        """The conversation as the history API shows it."""
        return {"id": self.id, "title": self.title, "created_at": iso(self.created_at),
                "updated_at": iso(self.updated_at),
                "message_count": self.message_count if message_count is None else message_count}


class Message(BaseModel):
    """One message of a conversation: the user's, or the model's reply."""

    COMPLETE, INTERRUPTED, ERROR, STOPPED = "complete", "interrupted", "error", "stopped"

    conversation = ForeignKeyField(Conversation, field=Conversation.key, column_name="conversation_key",
                                   backref="messages", on_delete="CASCADE")
    role = CharField(max_length=16)
    content = TextField()
    status = CharField(max_length=16, default=COMPLETE)
    token_count = IntegerField(null=True)
    prompt_tokens = IntegerField(null=True)
    created_at = DateTimeField(default=utcnow)
    # The turn that wrote the message: a turn saved after its process died is saved once.
    turn = CharField(max_length=32, null=True)
    # Of a reply: the model that wrote it, and whether its counts are the model's own usage
    # ("model") or the service's estimate ("estimate").
    model = CharField(max_length=128, null=True)
    token_source = CharField(max_length=16, null=True)

    class Meta:
        table_name = "chat_message"
        indexes = ((("conversation", "id"), False), (("turn", "role"), True))

    @classmethod
    def page_of(cls, conversation_key, limit, after=0):
        """A page of a conversation's messages, oldest first, after message id `after`."""
        return list(cls.select().where((cls.conversation == conversation_key) & (cls.id > after))
                    .order_by(cls.id).limit(limit))

    @classmethod
    def spent(cls, owner, since, until):
        """The tokens (prompt and completion) of the owner's turns saved in [since, until)."""
        total = (cls.select(fn.COALESCE(fn.SUM(fn.COALESCE(cls.prompt_tokens, 0) + fn.COALESCE(cls.token_count, 0)), 0))
                 .join(Conversation).where((Conversation.owner == owner) & (cls.role == "assistant")
                                           & (cls.created_at >= since) & (cls.created_at < until)))
        return int(total.scalar() or 0)

    @classmethod
    def usage(cls, since, until, owner=None):
        """Per owner, day and model: turns, prompt and completion tokens, and turns counted by estimate."""
        day = fn.DATE(cls.created_at)
        estimated = fn.SUM(Case(None, [(cls.token_source == "estimate", 1)], 0))
        query = (cls.select(Conversation.owner, day.alias("day"), cls.model, fn.COUNT(cls.id).alias("turns"),
                            fn.SUM(fn.COALESCE(cls.prompt_tokens, 0)).alias("prompt_tokens"),
                            fn.SUM(fn.COALESCE(cls.token_count, 0)).alias("completion_tokens"),
                            estimated.alias("estimated_turns"))
                 .join(Conversation)
                 .where((cls.role == "assistant") & (cls.created_at >= since) & (cls.created_at < until))
                 .group_by(Conversation.owner, day, cls.model)
                 .order_by(Conversation.owner, day, cls.model))
        if owner is not None:
            query = query.where(Conversation.owner == owner)
        return [{"user": row[0], "date": str(row[1])[:10], "model": row[2], "turns": int(row[3]),
                 "prompt_tokens": int(row[4] or 0), "completion_tokens": int(row[5] or 0),
                 "estimated_turns": int(row[6] or 0)} for row in query.tuples()]

    @classmethod
    def saved_status(cls, turn_id):
        """The status of the turn's reply if the turn is kept, else None."""
        reply = cls.select(cls.status).where((cls.turn == turn_id) & (cls.role == "assistant")).first()
        return None if reply is None else reply.status

    @classmethod
    def turn_saved(cls, turn_id):
        """Whether the turn's messages are already kept."""
        return cls.select(cls.id).where(cls.turn == turn_id).exists()

    @classmethod
    def count_in(cls, conversation_key):
        """How many messages a conversation has."""
        return cls.select().where(cls.conversation == conversation_key).count()

    def as_json(self):
        """The message as the history API shows it."""
        return {"id": self.id, "role": self.role, "content": self.content, "status": self.status,
                "created_at": iso(self.created_at), "token_count": self.token_count,
                "prompt_tokens": self.prompt_tokens}

    @classmethod
    def recent(cls, conversation_key, limit):
        """The last `limit` messages of a conversation, oldest first."""
        query = (cls.select(cls.role, cls.content)
                 .where(cls.conversation == conversation_key)
                 .order_by(cls.id.desc()).limit(limit))
        return [{"role": m.role, "content": m.content} for m in reversed(list(query))]


# A turn in one statement: create the user's conversation or mark its new version, then
# insert both messages; `n` keeps the user's message first. A turn already saved (by another
# process, after this one stalled past its lease) is not saved again. BEGIN rides along, so the turn
# costs two round trips (this and COMMIT) where peewee's atomic() costs three; a connection
# lost before COMMIT writes nothing. The one transaction peewee does not know of: save_turn
# refuses to run inside one of peewee's, whose COMMIT it would otherwise end early.
SAVE_TURN_SQL = """
BEGIN;
WITH claimed AS (
    INSERT INTO chat_conversation (id, owner, title, created_at, updated_at, version)
    SELECT %(id)s, %(owner)s, %(title)s, %(now)s, %(now)s, %(version)s
    WHERE NOT EXISTS (SELECT 1 FROM chat_message WHERE turn = %(turn)s)
    ON CONFLICT (owner, id) DO UPDATE SET updated_at = EXCLUDED.updated_at, version = EXCLUDED.version
    RETURNING key
)
INSERT INTO chat_message (conversation_key, role, content, status, token_count, prompt_tokens, created_at, turn,
                          model, token_source)
SELECT claimed.key, m.role, m.content, m.status, m.token_count, m.prompt_tokens, %(now)s, %(turn)s,
       m.model, m.token_source
FROM claimed, (VALUES
    (1, 'user', %(message)s, 'complete', %(message_tokens)s::integer, NULL::integer, NULL, NULL),
    (2, 'assistant', %(reply)s, %(status)s, %(reply_tokens)s::integer, %(prompt_tokens)s::integer,
     %(model)s, %(token_source)s)
) AS m (n, role, content, status, token_count, prompt_tokens, model, token_source)
ORDER BY m.n
"""


def save_turn(*, conversation_id, owner, message, reply, status, message_tokens=None,
              reply_tokens=None, prompt_tokens=None, turn_id=None, model=None, token_source=None):
    """Write a finished turn (the user message and the reply) all or nothing; the conversation's new version.

    Creates the owner's conversation on its first turn. A turn is saved once: None, writing nothing,
    if a turn of that `turn_id` is saved already.
    """
    if db.in_transaction():
        raise RuntimeError("save_turn runs its own transaction; it cannot be nested in another")
    row = {"id": conversation_id, "owner": owner, "now": utcnow(), "version": secrets.token_hex(16),
           "title": " ".join(message.split())[:AUTO_TITLE_CHARS], "message": message,
           "message_tokens": message_tokens, "reply": reply, "status": status,
           "reply_tokens": reply_tokens, "prompt_tokens": prompt_tokens, "turn": turn_id,
           "model": model, "token_source": token_source}
    try:
        saved = _save_on_postgres(row) if backend_name() == "postgresql" else _save_with_peewee(row)
    except IntegrityError:  # the same turn, saved at the same moment by another process
        return None
    return row["version"] if saved else None


def _save_on_postgres(row):
    """The turn in one statement and a COMMIT; whether it was saved (not already)."""
    try:
        saved = db.execute_sql(SAVE_TURN_SQL, row).rowcount
        db.execute_sql("COMMIT")
        return bool(saved)
    except BaseException:
        with contextlib.suppress(PeeweeException, OSError):  # the first failure is the one to tell
            db.execute_sql("ROLLBACK")
        raise


def _save_with_peewee(row):
    """The turn in peewee's transaction (SQLite has no data-modifying CTE); whether it was saved (not already)."""
    with db.atomic():
        if row["turn"] is not None and Message.turn_saved(row["turn"]):
            return False
        key = (Conversation.insert(id=row["id"], owner=row["owner"], title=row["title"],
                                   created_at=row["now"], updated_at=row["now"], version=row["version"])
               .on_conflict(conflict_target=[Conversation.owner, Conversation.id],
                            update={Conversation.updated_at: row["now"], Conversation.version: row["version"]})
               .returning(Conversation.key).tuples().execute())
        key = list(key)[0][0]
        # insert_many takes its columns from the first row: both rows name every one.
        Message.insert_many([
            {"conversation": key, "role": "user", "content": row["message"],
             "status": Message.COMPLETE, "token_count": row["message_tokens"],
             "prompt_tokens": None, "created_at": row["now"], "turn": row["turn"],
             "model": None, "token_source": None},
            {"conversation": key, "role": "assistant", "content": row["reply"],
             "status": row["status"], "token_count": row["reply_tokens"],
             "prompt_tokens": row["prompt_tokens"], "created_at": row["now"], "turn": row["turn"],
             "model": row["model"], "token_source": row["token_source"]},
        ]).execute()
    return True


def create_tables():
    """Create the tables and indexes if they do not exist, and move over what an earlier layout kept.

    Safe to run again: once moved, the earlier tables are gone.
    """
    with db.atomic():
        db.create_tables([Conversation, Message], safe=True)
        if {"conversation", "message"} <= set(db.get_tables()):
            _move_global_ids()
        _add_missing_columns()


def _add_missing_columns():
    """Add the columns a chat_message table made by an earlier 0.5 build lacks (model, token_source)."""
    present = {column.name for column in db.get_columns("chat_message")}
    missing = [name for name in ("model", "token_source") if name not in present]
    if missing:
        migrator = SchemaMigrator.from_database(db.obj)
        migrate(*[migrator.add_column("chat_message", name, Message._meta.fields[name]) for name in missing])


# Until 0.5, a conversation id was one name for all users (tables `conversation`, keyed by
# id, and `message`). Each conversation keeps its id and owner, each message its id, so
# cursors and links stay valid.
MOVE_GLOBAL_IDS_SQL = [
    """INSERT INTO chat_conversation (id, owner, title, created_at, updated_at, version)
       SELECT id, owner, title, created_at, updated_at, version FROM conversation""",
    """INSERT INTO chat_message (id, conversation_key, role, content, status, token_count,
                                 prompt_tokens, created_at)
       SELECT m.id, c.key, m.role, m.content, m.status, m.token_count, m.prompt_tokens, m.created_at
       FROM message m JOIN conversation old ON old.id = m.conversation_id
       JOIN chat_conversation c ON c.owner = old.owner AND c.id = old.id""",
    "DROP TABLE message",
    "DROP TABLE conversation",
]


def _move_global_ids():
    """Copy the conversations and messages of the earlier layout, then drop its tables."""
    for statement in MOVE_GLOBAL_IDS_SQL:
        db.execute_sql(statement)
    if backend_name() == "postgresql":
        db.execute_sql("SELECT setval(pg_get_serial_sequence('chat_message', 'id'), "
                       "COALESCE(MAX(id), 0) + 1, false) FROM chat_message")
