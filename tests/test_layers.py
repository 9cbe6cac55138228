"""What each layer promises the one above it: the database's failures, its one transaction, the caller's token;
and that imports run one way, views -> services -> the database, the cache, the coordination and the model."""

import ast
import importlib
import logging
import os

import peewee
import psycopg2
import pytest
from flask import g
from flask_jwt_extended import get_jwt

import auth
import models
from tests.helpers import ROOT, assert_error, bearer, database_backends, locked_table

# The layer that serves HTTP: the factory and its views, the hooks of a request, the page, the request log, the
# worker. Below it: the services (SERVICES) and what they call.
WEB_LAYER = {"chat_app", "auth", "web", "logs", "worker"}
SERVICES = {"turns", "history", "usage", "health", "resume"}
# What the factory and the CLI of chat_app may do with the database: open it, answer its failures, make its tables.
DATABASE_IN_CHAT_APP = {"create_app", "plain_failures", "init_db_command"}
# A service's parts, which the web layer reaches only through the service's own methods.
SERVICE_PARTS = {"cache", "coordination", "journal", "model", "shared", "round_trip", "feeds"}


def test_save_turn_refuses_to_run_inside_another_transaction(app):
    """save_turn runs its own transaction: nested in peewee's, it would end the outer one early."""
    with models.db.connection_context():
        with pytest.raises(RuntimeError, match="cannot be nested"):
            with models.db.atomic():
                models.save_turn(conversation_id="c1", owner="alice", message="hi", reply="hello",
                                 status="complete")
        assert models.Message.select().count() == 0


def cut_by_statement_timeout(postgres_url):
    """A read that waits on a locked table past the connection's statement_timeout."""
    with locked_table(postgres_url, "chat_conversation"):
        models.db.execute_sql("SET statement_timeout = '100ms'")
        models.Conversation.state_of("alice", "c1")


def cut_by_lock_timeout(postgres_url):
    """A read that waits on a locked table past the connection's lock_timeout."""
    with locked_table(postgres_url, "chat_conversation"):
        models.db.execute_sql("SET lock_timeout = '100ms'")
        models.Conversation.state_of("alice", "c1")


def cut_by_the_server(postgres_url):
    """A read on a connection the server ended since it was opened (a restart, an administrator)."""
    backend = models.db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
    admin = psycopg2.connect(postgres_url)
    try:
        with admin.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", (backend,))
    finally:
        admin.close()
    models.Conversation.state_of("alice", "c1")


@pytest.mark.parametrize("cut,reason", [(cut_by_statement_timeout, "statement timeout"),
                                        (cut_by_lock_timeout, "lock timeout"),
                                        (cut_by_the_server, "the server closed the connection")],
                         ids=["statement-timeout", "lock-timeout", "connection-ended"])
def test_a_read_the_database_cuts_short_is_database_unavailable(postgres_url, postgres, cut, reason):
    """A query the database cancels or a connection it ends reaches the layer above as DatabaseUnavailable,
    saying why."""
    with pytest.raises(models.DatabaseUnavailable, match=reason):
        with models.connection():
            cut(postgres_url)


@pytest.mark.parametrize("failures", [1, 2], ids=["once", "twice"])
def test_a_turn_reads_its_history_once_more_after_the_database_cut_it(pg_client, llm, monkeypatch, failures):
    """The history read is tried again on a fresh connection: one cut is not seen, a second is a 503 before the
    model is asked."""
    state_of = models.Conversation.state_of.__func__
    calls = []

    def cut_then_read(cls, owner, conversation_id):
        """The real read, on a connection the server ends first for the first `failures` calls."""
        calls.append(conversation_id)
        if len(calls) <= failures:
            models.db.execute_sql("SELECT pg_terminate_backend(pg_backend_pid())")
        return state_of(cls, owner, conversation_id)

    monkeypatch.setattr(models.Conversation, "state_of", classmethod(cut_then_read))
    response = pg_client.post("/chat/run", json={"message": "hi", "conversation_id": "c1"}, headers=bearer())
    assert calls == ["c1", "c1"]
    if failures == 1:
        assert response.status_code == 200 and response.get_json()["response"] == "echo: hi"
    else:
        assert_error(response, 503, "database_unavailable")
        assert llm.requests == []


# A query the database refuses as wrong: a bug of the service, not a database that cannot be used.
WRONG_QUERIES = {"data-error": "SELECT 'x'::integer", "division-by-zero": "SELECT 1 / 0",
                 "syntax-error": "SELEC 1", "unknown-column": "SELECT no_such_column FROM chat_message",
                 "integrity-error": "INSERT INTO chat_message (conversation_key, role, content, status, created_at) "
                                    "VALUES (-1, 'user', 'x', 'complete', now())"}


@pytest.mark.parametrize("statement", WRONG_QUERIES.values(), ids=WRONG_QUERIES.keys())
def test_a_query_the_database_refuses_is_a_bug_not_an_outage(postgres_url, postgres, caplog, statement):
    """A DataError, ProgrammingError or IntegrityError reaches the caller as itself: no outage is said,
    and the pool keeps its connections."""
    caplog.set_level(logging.INFO, logger="outages")
    with models.connection():
        models.ping()  # the pool holds a connection, and no outage is left from an earlier test
    caplog.clear()
    backends = database_backends(postgres_url)
    with pytest.raises(peewee.DatabaseError) as raised:
        with models.connection():
            models.db.execute_sql(statement)
    assert not isinstance(raised.value, models.DatabaseUnavailable)
    assert models.outage.reason is None
    assert [r.getMessage() for r in caplog.records if r.name == "outages"] == []
    assert database_backends(postgres_url) == backends >= 1


def test_tables_never_made_are_an_outage_that_says_to_run_init_db(postgres):
    """PostgreSQL's missing table, like SQLite's, means the database cannot be used yet: the reason names init-db."""
    with pytest.raises(models.DatabaseUnavailable, match="init-db"):
        with models.connection():
            models.db.execute_sql("SELECT 1 FROM chat_never_made")


def test_a_query_the_database_refuses_is_a_500_logged_once(pg_client, monkeypatch, caplog):
    """Through the app: the one 500 of a bug, logged once with its traceback; /status says the database is up."""
    monkeypatch.setattr(models.Conversation, "page_of",
                        classmethod(lambda cls, *args: models.db.execute_sql("SELECT 1 / 0")))
    with caplog.at_level(logging.INFO):
        assert_error(pg_client.get("/conversations", headers=bearer()), 500, "internal_error")
    assert [r.getMessage() for r in caplog.records if r.exc_info] == ["unexpected error"]
    assert [r for r in caplog.records if r.name == "outages"] == []
    assert pg_client.get("/status").get_json()["database"] == {"state": "ok"}


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


# Imports run one way

def modules():
    """The names of the service's own modules (the top-level .py files)."""
    return {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py") and name.count(".") == 1}


def parsed(module):
    """The syntax tree of one of the service's modules."""
    with open(os.path.join(ROOT, f"{module}.py")) as source:
        return ast.parse(source.read())


def imported(tree):
    """The top-level names of the modules a syntax tree imports."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found


def names_bound_to(tree, module):
    """The names a syntax tree binds to `module` or to what it imports from it."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.asname or alias.name for alias in node.names if alias.name == module}
        elif isinstance(node, ast.ImportFrom) and node.module == module:
            found |= {alias.asname or alias.name for alias in node.names}
    return found


def names_in(node):
    """Every plain name a piece of syntax uses."""
    return {found.id for found in ast.walk(node) if isinstance(found, ast.Name)}


def test_no_view_of_chat_app_uses_the_database_layer():
    """Of chat_app's functions only the factory and the CLI name models; a view goes through a service."""
    tree = parsed("chat_app")
    database = names_bound_to(tree, "models")
    using = {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and names_in(node) & database}
    assert using <= DATABASE_IN_CHAT_APP


def test_only_the_services_and_the_factory_import_the_database_layer():
    """models is imported by the services (and by chat_app's factory and CLI), by nothing else."""
    importers = {module for module in modules() if "models" in imported(parsed(module))}
    assert importers <= SERVICES | {"chat_app"}


def test_nothing_below_the_web_layer_imports_flask():
    """Services, the database, the cache, the coordination and the model never see a request: plain values in."""
    flask_users = {module for module in modules() - WEB_LAYER
                   if imported(parsed(module)) & {"flask", "flask_jwt_extended", "werkzeug"}}
    assert flask_users == set()


def test_the_web_layer_never_reaches_through_a_service_into_its_parts():
    """No `services("chat").cache`, no `extensions["chat"].model`: the web layer calls a service's methods."""
    reaches = [(module, node.lineno, node.attr) for module in WEB_LAYER for node in ast.walk(parsed(module))
               if isinstance(node, ast.Attribute) and node.attr in SERVICE_PARTS
               and isinstance(node.value, (ast.Call, ast.Subscript))]
    assert reaches == []



def held_values(value, depth=3):
    """`value` and what it holds, a few containers deep."""
    yield value
    if depth and isinstance(value, dict):
        value = list(value.values())
    if depth and isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from held_values(item, depth - 1)


def test_no_error_is_a_shared_instance():
    """An error is built where it is raised: a module-level one, raised by concurrent turns, would carry the
    last raiser's traceback (and its frames) to every other."""
    shared = [(module, name) for module in modules() for name, value in vars(importlib.import_module(module)).items()
              if any(isinstance(held, BaseException) for held in held_values(value))]
    assert shared == []


def test_no_test_module_imports_another():
    """Shared test code lives in tests/helpers.py (functions) and tests/conftest.py (fixtures), written once."""
    tests_dir = os.path.join(ROOT, "tests")
    importing = []
    for name in sorted(os.listdir(tests_dir)):
        if name.startswith("test_") and name.endswith(".py"):
            with open(os.path.join(tests_dir, name)) as source:
                tree = ast.parse(source.read())
            for node in ast.walk(tree):
                modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                           else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                importing += [(name, module) for module in modules if module.startswith("tests.test_")]
    assert importing == []
