"""What a new user relies on: the Procfile, the README's commands, CI running them."""

import os
import re
import subprocess
import sys

import models
from tests.helpers import ROOT, SECRET, answers, claims_of, free_port, wait_until


def procfile():
    """The Procfile's process types and their commands."""
    with open(os.path.join(ROOT, "Procfile")) as lines:
        return dict(line.rstrip("\n").split(": ", 1) for line in lines if line.strip())


def readme():
    """The README's text."""
    with open(os.path.join(ROOT, "README.md")) as text:
        return text.read()


def shell(command, env, **kwargs):
    """Run a Procfile command as a PaaS would: through a shell, with the venv's tools on PATH."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    return subprocess.Popen(["bash", "-c", command], cwd=ROOT, env={**os.environ, **env, "PATH": path},
                            **kwargs)


def test_release_command_creates_the_tables(tmp_path):
    """The Procfile's release line (flask init-db) creates the tables on an empty database."""
    url = f"sqlite:///{tmp_path / 'release.db'}"
    release = shell(procfile()["release"], {"DATABASE_URL": url, "JWT_SECRET_KEY": SECRET})
    assert release.wait(60) == 0
    database = models.open_database(url, 1, 5)
    with database.connection_context():
        assert {"chat_conversation", "chat_message"} <= set(database.get_tables())


def test_web_command_serves_on_the_port_the_platform_gives(tmp_path):
    """The Procfile's web line binds 0.0.0.0:$PORT and answers /status."""
    port = free_port()
    env = {"PORT": str(port), "DATABASE_URL": f"sqlite:///{tmp_path / 'web.db'}",
           "JWT_SECRET_KEY": SECRET, "REDIS_URL": "", "LLM_BASE_URL": ""}
    web = shell(procfile()["web"], env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: answers(f"http://127.0.0.1:{port}/status"), timeout=30)
    finally:
        web.terminate()
        web.wait(30)


def test_web_refuses_to_start_without_a_strong_secret(tmp_path):
    """In production the service will not start with a missing or short JWT_SECRET_KEY."""
    env = {"PORT": str(free_port()), "DATABASE_URL": f"sqlite:///{tmp_path / 'web.db'}",
           "JWT_SECRET_KEY": "tiny-secret-xyz", "APP_ENV": "production", "REDIS_URL": ""}
    web = shell(procfile()["web"], env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = web.communicate(timeout=60)[0].decode()
    assert web.returncode != 0
    assert "JWT_SECRET_KEY must be set to at least 32 bytes" in output
    assert "tiny-secret-xyz" not in output


def test_ci_runs_the_readme_test_command():
    """.ci/run runs exactly the test command the README gives."""
    command = re.search(r"^(python3\.11 -m venv .* -m pytest)$", readme(), re.M).group(1)
    with open(os.path.join(ROOT, ".ci", "run")) as script:
        assert command in script.read().splitlines()


def test_readme_lists_every_setting():
    """Every setting config.py reads from the environment is documented in the README."""
    with open(os.path.join(ROOT, "config.py")) as source:
        settings = set(re.findall(r'"([A-Z][A-Z_]+)"', source.read()))
    missing = {name for name in settings if f"`{name}`" not in readme()}
    assert missing == set()


def test_create_token_prints_only_the_token(tmp_path):
    """`TOKEN=$(flask --app chat_app create-token alice)` captures a token and nothing else."""
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}", "JWT_SECRET_KEY": SECRET, "REDIS_URL": ""}
    cli = shell("flask --app chat_app create-token alice", env, stdout=subprocess.PIPE)
    printed = cli.communicate(timeout=60)[0].decode()
    assert cli.returncode == 0
    assert claims_of(printed)["sub"] == "alice"
    assert printed.count("\n") == 1
