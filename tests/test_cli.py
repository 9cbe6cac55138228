"""The command line (`flask --app chat_app ...`) and the checks create_app makes at startup."""

import os
import stat
import subprocess
import sys
import time

import pytest

import chat_app
import models
from config import ConfigError
from tests.helpers import ROOT, SECRET, Service, bearer, claims_of, flask_cli, free_port, stored_conversation

TABLES = {"chat_conversation", "chat_message"}


@pytest.fixture
def cli_app(make_app, tmp_path):
    """An app on a SQLite file and the fake model, signing with the test secret."""
    return make_app(DATABASE_URL=f"sqlite:///{tmp_path / 'cli.db'}", REDIS_URL=None)


@pytest.fixture
def settings(tmp_path):
    """Settings for create_app on a fresh SQLite file and the demo model; the pool is closed after."""
    yield {"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "REDIS_URL": None, "LLM_BASE_URL": None}
    if models.db.obj is not None:
        models.db.obj.close_all()


def test_create_token_runs_from_the_app_cli_test_runner(cli_app):
    """`create-token` works when invoked through app.cli, as Flask's test runner does."""
    result = cli_app.test_cli_runner().invoke(args=["create-token", "alice"])
    assert result.exit_code == 0, result.output
    assert claims_of(result.output)["sub"] == "alice"


def test_create_token_is_for_the_named_user(cli_app, monkeypatch):
    """`create-token USER` prints an HS256 token whose subject is USER."""
    result = flask_cli(cli_app, monkeypatch, "create-token", "carol")
    assert result.exit_code == 0, result.output
    assert claims_of(result.output)["sub"] == "carol"


@pytest.mark.parametrize("args, lifetime", [([], 86400), (["--expires-in", "60"], 60)],
                         ids=["default-one-day", "sixty-seconds"])
def test_create_token_expires_after_the_asked_lifetime(cli_app, monkeypatch, args, lifetime):
    """The printed token expires `lifetime` seconds after it was made."""
    before = time.time()
    result = flask_cli(cli_app, monkeypatch, "create-token", "alice", *args)
    after = time.time()
    assert result.exit_code == 0, result.output
    assert before + lifetime - 1 <= claims_of(result.output)["exp"] <= after + lifetime + 1


def test_create_token_with_expires_in_zero_never_expires(cli_app, monkeypatch):
    """`--expires-in 0` prints a token without an exp claim."""
    result = flask_cli(cli_app, monkeypatch, "create-token", "alice", "--expires-in", "0")
    assert result.exit_code == 0, result.output
    assert "exp" not in claims_of(result.output)


def test_create_token_refuses_a_negative_lifetime(cli_app, monkeypatch):
    """`--expires-in -60` is refused instead of printing a token that never expires."""
    result = flask_cli(cli_app, monkeypatch, "create-token", "alice", "--expires-in", "-60")
    assert result.exit_code != 0, f"printed a token with claims {claims_of(result.output)}"


def test_created_token_is_accepted_by_chat_run(cli_app, monkeypatch):
    """The printed token authenticates POST /chat/run."""
    printed = flask_cli(cli_app, monkeypatch, "create-token", "alice").output.strip()
    response = cli_app.test_client().post("/chat/run", json={"message": "hi"},
                                          headers={"Authorization": f"Bearer {printed}"})
    assert response.status_code == 200, response.get_json()


def test_create_token_output_holds_no_secret(cli_app, monkeypatch):
    """Nothing the command prints contains the signing secret."""
    result = flask_cli(cli_app, monkeypatch, "create-token", "alice")
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output


def table_names():
    """The tables of the bound database."""
    with models.db.connection_context():
        return set(models.db.get_tables())


@pytest.fixture
def fresh_app(settings):
    """An app on a SQLite file that has no tables yet."""
    app = chat_app.create_app({**settings, "JWT_SECRET_KEY": SECRET})
    assert table_names() == set()
    return app


def test_init_db_creates_the_tables(fresh_app, monkeypatch):
    """`init-db` creates the conversation and message tables on a fresh database."""
    result = flask_cli(fresh_app, monkeypatch, "init-db")
    assert result.exit_code == 0, result.output
    assert TABLES <= table_names()


def test_init_db_is_idempotent(fresh_app, monkeypatch):
    """A second `init-db` succeeds and keeps what the tables hold."""
    assert flask_cli(fresh_app, monkeypatch, "init-db").exit_code == 0
    with models.db.connection_context():
        models.Conversation.create(id="kept", owner="alice")
    result = flask_cli(fresh_app, monkeypatch, "init-db")
    assert result.exit_code == 0, result.output
    assert stored_conversation("kept").owner == "alice"


WEAK_SECRETS = {"missing": None, "empty": "", "31-bytes": "s" * 31, "31-bytes-in-16-chars": "é" * 15 + "s"}


@pytest.mark.parametrize("secret", WEAK_SECRETS.values(), ids=WEAK_SECRETS.keys())
def test_production_refuses_a_weak_secret(settings, secret):
    """In production, create_app refuses a missing or shorter than 32-byte JWT_SECRET_KEY."""
    with pytest.raises(ConfigError, match="JWT_SECRET_KEY"):
        chat_app.create_app({**settings, "APP_ENV": "production", "JWT_SECRET_KEY": secret})


@pytest.mark.parametrize("secret", ["s" * 32, "é" * 16], ids=["32-ascii", "32-bytes-in-16-chars"])
def test_production_accepts_a_32_byte_secret(settings, secret):
    """In production, a JWT_SECRET_KEY of 32 bytes is enough."""
    app = chat_app.create_app({**settings, "APP_ENV": "production", "JWT_SECRET_KEY": secret})
    assert app.config["JWT_SECRET_KEY"] == secret


@pytest.fixture
def instance_dir(tmp_path, monkeypatch):
    """A not yet existing instance folder that create_app uses instead of the real one."""
    path = tmp_path / "instance"
    monkeypatch.setattr(chat_app, "INSTANCE_DIR", str(path))
    return path


def development_app(settings):
    """An app in development with no JWT_SECRET_KEY."""
    return chat_app.create_app({**settings, "APP_ENV": "development", "JWT_SECRET_KEY": None})


def test_production_never_generates_a_secret(settings, instance_dir):
    """Production without a secret fails without writing one to the instance folder."""
    with pytest.raises(ConfigError):
        chat_app.create_app({**settings, "APP_ENV": "production", "JWT_SECRET_KEY": None})
    assert not (instance_dir / "jwt-secret").exists()


def test_development_generates_a_strong_secret(settings, instance_dir):
    """Development without a secret signs with a generated one of at least 32 bytes."""
    secret = development_app(settings).config["JWT_SECRET_KEY"]
    assert len(secret.encode()) >= 32


def test_generated_secret_is_kept_in_the_instance_folder(settings, instance_dir):
    """The generated secret is the content of instance/jwt-secret."""
    secret = development_app(settings).config["JWT_SECRET_KEY"]
    assert (instance_dir / "jwt-secret").read_text().strip() == secret


def test_generated_secret_file_is_private(settings, instance_dir):
    """instance/jwt-secret is readable and writable by its owner only (mode 0600)."""
    development_app(settings)
    assert stat.S_IMODE(os.stat(instance_dir / "jwt-secret").st_mode) == 0o600


def test_generated_secret_is_reused(settings, instance_dir):
    """A second app in development signs with the secret the first one generated."""
    first = development_app(settings).config["JWT_SECRET_KEY"]
    second = development_app(settings).config["JWT_SECRET_KEY"]
    assert first == second


def test_generated_secret_signs_accepted_tokens(settings, instance_dir):
    """A token signed with the kept secret is accepted by a development app."""
    app = development_app(settings)
    with app.app_context():
        models.create_tables()
    secret = (instance_dir / "jwt-secret").read_text().strip()
    response = app.test_client().post("/chat/run", json={"message": "hi"}, headers=bearer(secret=secret))
    assert response.status_code == 200, response.get_json()


@pytest.mark.parametrize("written, verify", [("false", False), ("0", False), ("no", False), ("off", False),
                                             ("true", True), ("1", True), ("", True)])
def test_redis_tls_verify_reads_true_or_false(settings, monkeypatch, written, verify):
    """REDIS_TLS_VERIFY is on unless it says false, 0, no or off."""
    monkeypatch.setenv("REDIS_TLS_VERIFY", written)
    app = chat_app.create_app({**settings, "JWT_SECRET_KEY": SECRET})
    assert app.config["REDIS_TLS_VERIFY"] is verify


def test_redis_tls_verify_refuses_anything_but_true_or_false(settings, monkeypatch):
    """A REDIS_TLS_VERIFY that is neither is a clear startup error, not a guess about certificate checks."""
    monkeypatch.setenv("REDIS_TLS_VERIFY", "maybe")
    with pytest.raises(ConfigError, match="REDIS_TLS_VERIFY must be true or false, not 'maybe'"):
        chat_app.create_app(settings)


# The real command line, in a process of its own, and gunicorn on the same settings

SETTINGS = ("APP_ENV", "DATABASE_URL", "REDIS_URL", "LLM_BASE_URL", "LLM_API_KEY", "JWT_SECRET_KEY", "JWT_PUBLIC_KEY",
            "JWT_JWKS_URL", "JWT_SECRET_KEY_PREVIOUS")


def environment(tmp_path, settings):
    """This process's environment without the service's settings, then the test's defaults and `settings`."""
    env = {name: value for name, value in os.environ.items() if name not in SETTINGS}
    env.update(JWT_SECRET_KEY=SECRET, DATABASE_URL=f"sqlite:///{tmp_path / 'cli.db'}")
    env.update(settings)
    return {name: value for name, value in env.items() if value is not None}


def real_cli(tmp_path, *args, **settings):
    """Run `.venv/bin/flask --app chat_app ARGS` as a user would: (exit status, its output lines)."""
    flask = os.path.join(os.path.dirname(sys.executable), "flask")
    done = subprocess.run([flask, "--app", "chat_app", *args], cwd=ROOT, env=environment(tmp_path, settings),
                          capture_output=True, text=True, timeout=60)
    return done.returncode, [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


def a_file(tmp_path):
    """A file where a folder would have to be."""
    (tmp_path / "a-file").write_text("")
    return tmp_path / "a-file"


# (name, settings (callables of tmp_path), the one line the command and gunicorn must say)
BAD_SETTINGS = [
    ("database-url-scheme", {"DATABASE_URL": lambda tmp: "mysq://chat@db.internal/chat"},
     "Error: DATABASE_URL must be a postgresql:// or sqlite:/// URL (it starts with mysq://)"),
    ("database-url-port", {"DATABASE_URL": lambda tmp: "postgresql://chat:hunter2@db.internal:54x2/chat"},
     "Error: the port in DATABASE_URL must be a number"),
    ("sqlite-folder", {"DATABASE_URL": lambda tmp: f"sqlite:///{a_file(tmp)}/data/chat.db"},
     "Error: the folder of DATABASE_URL's SQLite file cannot be created (Not a directory)"),
    ("llm-base-url-scheme", {"LLM_BASE_URL": lambda tmp: "llm.internal:8080"},
     "Error: LLM_BASE_URL must start with http:// or https:// (such as https://api.openai.com/v1)"),
    ("database-pool-size", {"DATABASE_POOL_SIZE": lambda tmp: "0"}, "Error: DATABASE_POOL_SIZE must be at least 1, not '0'"),
    ("redis-pool-size", {"REDIS_POOL_SIZE": lambda tmp: "0"}, "Error: REDIS_POOL_SIZE must be at least 1, not '0'"),
    ("redis-url-scheme", {"REDIS_URL": lambda tmp: "http://127.0.0.1:6379/0"},
     "Error: REDIS_URL must start with redis://, rediss:// or unix://"),
    ("no-jwt-secret", {"JWT_SECRET_KEY": lambda tmp: None},
     "Error: JWT_SECRET_KEY must be set to at least 32 bytes (or JWT_JWKS_URL or JWT_PUBLIC_KEY for your identity "
     "provider's tokens, or APP_ENV=development to generate a local secret)"),
]


def settings_of(given, tmp_path):
    """The settings of a BAD_SETTINGS row for this test's folder."""
    return {name: value(tmp_path) for name, value in given.items()}


@pytest.mark.parametrize("given,said", [(g, s) for _, g, s in BAD_SETTINGS], ids=[n for n, _, _ in BAD_SETTINGS])
def test_a_setting_the_cli_cannot_start_with_is_one_error_line(tmp_path, given, said):
    """`create-token` with a bad setting: exit status 1 and one line saying which and why, no traceback."""
    status, lines = real_cli(tmp_path, "create-token", "alice", **settings_of(given, tmp_path))
    assert (status, lines) == (1, [said])
    assert "hunter2" not in "".join(lines)


def test_a_database_that_cannot_be_reached_is_one_error_line(tmp_path):
    """init-db with nothing listening at DATABASE_URL: only the Error: line (no log line before it)."""
    status, lines = real_cli(tmp_path, "init-db", DATABASE_URL=f"postgresql://root@127.0.0.1:{free_port()}/chat")
    assert (status, lines) == (1, ["Error: the database cannot be used: connection refused: nothing listens at the "
                                   "host and port of DATABASE_URL (is PostgreSQL running?)"])


def test_a_sqlite_file_without_tables_says_to_run_init_db(tmp_path):
    """A command on a SQLite file init-db never ran on: the same hint as PostgreSQL's."""
    status, lines = real_cli(tmp_path, "usage")
    assert (status, lines) == (1, ["Error: the database cannot be used: the tables do not exist: run "
                                   "`.venv/bin/flask --app chat_app init-db` (the Procfile's release command)"])


@pytest.mark.slow
@pytest.mark.parametrize("given,said", [(g, s) for _, g, s in BAD_SETTINGS], ids=[n for n, _, _ in BAD_SETTINGS])
def test_gunicorn_refuses_to_start_on_a_bad_setting_with_the_same_line(tmp_path, given, said):
    """The service under gunicorn exits at once; its log holds the one line, and no traceback."""
    service = Service(environment(tmp_path, {"APP_ENV": "production", **settings_of(given, tmp_path)}))
    with pytest.raises(RuntimeError, match="gunicorn exited"):
        service.start()
    log = service.output()
    assert said in log.splitlines()
    assert "Traceback" not in log and "hunter2" not in log
    assert service.process.wait(10) != 0


@pytest.mark.parametrize("lease", ["0", "-1", "10.5", "600", "nan", "inf"])
def test_lease_seconds_out_of_range_is_a_clear_startup_error(settings, monkeypatch, lease):
    """LEASE_SECONDS must be more than 0 (at 0 the keeper would renew in a loop) and at most 10 (a dead instance
    frees its conversations within it)."""
    monkeypatch.setenv("LEASE_SECONDS", lease)
    with pytest.raises(ConfigError, match=f"LEASE_SECONDS must be more than 0 and at most 10, not '{lease}'"):
        chat_app.create_app({**settings, "JWT_SECRET_KEY": SECRET})


def test_lease_seconds_within_range_is_taken(settings, monkeypatch):
    """A short lease, as the tests of a stalled instance use, is accepted as given."""
    monkeypatch.setenv("LEASE_SECONDS", "1.5")
    assert chat_app.create_app({**settings, "JWT_SECRET_KEY": SECRET}).config["LEASE_SECONDS"] == 1.5


@pytest.mark.parametrize("heartbeat", ["0", "-1", "nan", "7200"])
def test_a_heartbeat_that_is_not_a_while_is_a_clear_startup_error(settings, monkeypatch, heartbeat):
    """SSE_HEARTBEAT_SECONDS must be more than 0 (at 0 every reader would send pings in a loop) and at most an hour."""
    monkeypatch.setenv("SSE_HEARTBEAT_SECONDS", heartbeat)
    said = f"SSE_HEARTBEAT_SECONDS must be more than 0 and at most 3600, not '{heartbeat}'"
    with pytest.raises(ConfigError, match=said):
        chat_app.create_app({**settings, "JWT_SECRET_KEY": SECRET})
