"""Managed Redis and PostgreSQL as PaaS providers hand them out: TLS only, often with a self-signed certificate.

Each test starts its own servers on loopback, with certificates it makes with openssl: a
redis-server that speaks TLS only and asks for a password (as Heroku Redis does), a
PostgreSQL cluster whose pg_hba.conf admits TLS connections only, and one that offers no TLS. The service under gunicorn
checks the certificate as the user chose, and when it cannot use a part, says why: once in
its log, and in /status.
"""

import glob
import os
import shutil
import subprocess
import tempfile

import psycopg2
import pytest
import requests

import models
from outages import Unavailable
from redis_link import RedisLink
from tests.fake_llm import Script
from tests.faults import RedisServer
from tests.helpers import (ACCESS_LOG_WITH_PID, Holder, assert_error, busy_answers_by_worker, cached_contents,
                           free_port, lease_key, listening_for_stops, service_missing, wait_until)

# Each scenario starts servers of its own and a service on them: a second or two each.
pytestmark = pytest.mark.slow

PASSWORD = "heroku-style-pass-0123456789"
PASSWORD_USER = "chat_with_password"
SELF_SIGNED = ("certificate verification failed (self-signed certificate); set REDIS_TLS_VERIFY=false for "
               "providers that use self-signed certificates (Heroku Redis), or REDIS_TLS_CA_FILE to the CA that "
               "signed the server's certificate")
PER_PROCESS = "Until it is back, turns are guarded per process only"
REQUIRES_TLS = ("the server requires TLS (it refuses connections without encryption); add ?sslmode=require "
                "to DATABASE_URL")
NAMES = "subjectAltName=IP:127.0.0.1,DNS:localhost"


# Certificates, made with the openssl command

def openssl(folder, *args):
    """Run the openssl command in `folder`."""
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=30)


def new_key(folder, name):
    """A new P-256 private key file `name`.key."""
    openssl(folder, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """A self-signed server certificate, a private CA and a server certificate it signed, for 127.0.0.1."""
    if shutil.which("openssl") is None:
        service_missing("openssl", "the openssl command is not on PATH")
    folder = tmp_path_factory.mktemp("certificates")
    for name in ("self-signed", "ca", "server"):
        new_key(folder, name)
    openssl(folder, "req", "-x509", "-key", "self-signed.key", "-out", "self-signed.pem", "-days", "2",
            "-subj", "/CN=localhost", "-addext", NAMES)
    openssl(folder, "req", "-x509", "-key", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=Test private CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl(folder, "req", "-new", "-key", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (folder / "server.ext").write_text(f"{NAMES}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
                                       "extendedKeyUsage=serverAuth\n")
    openssl(folder, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "server.ext")
    return folder


def tls_redis_server(certificate, key):
    """A private redis-server speaking TLS only with this certificate, asking for PASSWORD."""
    if shutil.which("redis-server") is None:
        service_missing("redis-server", "the redis-server command is not on PATH")
    return RedisServer(tls=(certificate, key), password=PASSWORD).start()


@pytest.fixture
def self_signed_redis(certificates):
    """A TLS-only Redis with a self-signed certificate, as Heroku Redis hands out."""
    server = tls_redis_server(certificates / "self-signed.pem", certificates / "self-signed.key")
    yield server
    server.close()


@pytest.fixture
def private_ca_redis(certificates):
    """A TLS-only Redis whose certificate the test's private CA signed."""
    server = tls_redis_server(certificates / "server.pem", certificates / "server.key")
    yield server
    server.close()


def public_status(service):
    """The /status document anyone gets, without a token."""
    return requests.get(service.url + "/status", headers={"Connection": "close"}, timeout=10).json()


# Redis over TLS

def test_a_self_signed_certificate_is_refused_by_default_and_the_log_and_status_say_why(start_service,
                                                                                       self_signed_redis):
    """Verification is on unless turned off: the service says, once, which setting lets it use such a Redis."""
    service = start_service(REDIS_URL=self_signed_redis.url)
    for n in range(3):
        response = service.run(f"hello {n}", "c1")
        assert response.status_code == 200, response.text  # the database carries on without Redis
    about = service.status_once(lambda about: about["cache"]["state"] == "unavailable")
    assert about["status"] == "degraded"
    assert about["cache"] == {"state": "unavailable", "backend": "redis", "reason": SELF_SIGNED,
                              "turn_leases": "per_process"}
    assert public_status(service) == {"status": "degraded", "database": {"state": "ok"},
                                      "cache": {"state": "unavailable"}}
    said = service.messages("Redis cannot be used:")
    assert len(said) == 1, said
    assert said[0].startswith(f"Redis cannot be used: {SELF_SIGNED}. {PER_PROCESS}")
    assert PASSWORD not in service.output()


@pytest.mark.parametrize("setting", ["REDIS_TLS_VERIFY=false", "?ssl_cert_reqs=none"])
def test_turning_verification_off_uses_the_redis_for_leases_across_two_workers(start_service, llm, self_signed_redis,
                                                                               setting):
    """With verification off (our setting or redis-py's own), a turn held in one worker is a 409 in the other."""
    settings = {"REDIS_URL": self_signed_redis.url}
    if setting.startswith("?"):
        settings["REDIS_URL"] += setting
    else:
        settings["REDIS_TLS_VERIFY"] = "false"
    service = start_service(workers=2, GUNICORN_CMD_ARGS=ACCESS_LOG_WITH_PID, **settings)
    about = service.status()
    assert about["cache"]["state"] == "ok" and about["cache"]["turn_leases"] == "shared", about
    with self_signed_redis.client() as probe:
        assert wait_until(lambda: listening_for_stops(probe), timeout=10)  # the stop listener uses TLS too
        holder = Holder(service, llm, "stream", "c1")
        assert probe.get(lease_key("c1")) is not None  # the lease is in the TLS Redis

        def refused_in_both_workers():
            """Another turn on the held conversation; true once 409s came from two worker processes."""
            assert_error(service.run("second", "c1"), 409, "conversation_busy")
            refusing = [pid for pid, statuses in busy_answers_by_worker(service).items() if 409 in statuses]
            return len(refusing) >= 2

        assert wait_until(refused_in_both_workers, timeout=20, interval=0)
        llm.release()
        assert holder.finish() == "held reply"
        assert cached_contents(probe, "c1") == ["first", "held reply"]
    assert service.messages("Redis cannot be used") == []


def test_a_ca_file_that_signed_the_certificate_works_with_verification_on(start_service, llm, private_ca_redis,
                                                                          certificates):
    """REDIS_TLS_CA_FILE names the private CA: the certificate is checked, and passes."""
    service = start_service(REDIS_URL=private_ca_redis.url, REDIS_TLS_CA_FILE=str(certificates / "ca.pem"))
    llm.script(Script(reply="over TLS"))
    assert service.run("hello", "c1").status_code == 200
    about = service.status()
    assert about["cache"]["state"] == "ok" and about["cache"]["turn_leases"] == "shared", about
    with private_ca_redis.client() as probe:
        assert cached_contents(probe, "c1") == ["hello", "over TLS"]
        assert wait_until(lambda: listening_for_stops(probe), timeout=10)
    assert service.messages("Redis") == []


def test_without_the_ca_file_the_private_ca_is_unknown(private_ca_redis):
    """The same Redis, verification on and no CA file: the reason names REDIS_TLS_CA_FILE."""
    link = RedisLink(private_ca_redis.url)
    with pytest.raises(Unavailable, match="REDIS_TLS_CA_FILE") as raised:
        link.ping()
    assert str(raised.value).startswith("certificate verification failed (unable to get local issuer certificate)")


@pytest.fixture
def plain_redis():
    """A private redis-server without TLS that asks for PASSWORD."""
    server = RedisServer(password=PASSWORD).start()
    yield server
    server.close()


@pytest.mark.parametrize("url, reason", [
    (lambda tls, plain: tls.url.replace(PASSWORD, "wrong-password"),
     "authentication failed: check the password (and user name) in REDIS_URL"),
    (lambda tls, plain: plain.url.replace(f":{PASSWORD}@", ""),
     "authentication failed: check the password (and user name) in REDIS_URL"),
    (lambda tls, plain: tls.url.replace("rediss://", "redis://"),
     "the server reset the connection; if the server requires TLS, REDIS_URL must start with rediss://"),
    (lambda tls, plain: plain.url.replace("redis://", "rediss://"),
     "the TLS handshake timed out: the server does not seem to speak TLS on that port (a plain port needs a "
     "redis:// URL)"),
    (lambda tls, plain: f"redis://127.0.0.1:{free_port()}/0",
     "connection refused: nothing listens at the host and port of REDIS_URL"),
    (lambda tls, plain: "redis://no-such-host.invalid:6379/0",
     "unknown host: the host name in REDIS_URL does not resolve"),
], ids=["wrong-password", "no-password", "plain-url-to-a-tls-port", "tls-url-to-a-plain-port", "refused",
        "unknown-host"])
def test_each_redis_failure_is_said_in_words_a_user_can_act_on(self_signed_redis, plain_redis, url, reason, caplog):
    """The reason of a failure names its cause and the setting to change, never the password."""
    link = RedisLink(url(self_signed_redis, plain_redis), verify=False)
    with pytest.raises(Unavailable) as raised:
        link.ping()
    assert str(raised.value) == reason
    assert PASSWORD not in caplog.text and "wrong-password" not in caplog.text and "wrong-password" not in caplog.text


# PostgreSQL that admits TLS connections only

class TlsPostgres:
    """A private PostgreSQL cluster on loopback whose pg_hba.conf admits TLS connections only (or, without a
    certificate, one that does not offer TLS at all). Its user PASSWORD_USER signs in with PASSWORD."""

    def __init__(self, certificate=None, key=None):
        """Make the cluster in a new folder (initdb), not yet started."""
        binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda path: int(path.split("/")[-2]))
        if not binaries:
            service_missing("PostgreSQL's initdb", "no /usr/lib/postgresql/*/bin")
        self.bin = binaries[-1]
        self.port = free_port()
        self.folder = tempfile.mkdtemp(prefix="tls-postgres-")
        self.data = os.path.join(self.folder, "data")
        self.tls = certificate is not None
        if self.tls:
            for source, name in ((certificate, "server.pem"), (key, "server.key")):
                shutil.copy(source, os.path.join(self.folder, name))
            os.chmod(os.path.join(self.folder, "server.key"), 0o600)
        if os.geteuid() == 0:  # initdb refuses to run as root
            subprocess.run(["chown", "-R", "postgres:", self.folder], check=True)
        self._run("initdb", "-D", self.data, "-U", "root", "-A", "trust", "--no-sync", "--no-instructions")
        kind = "hostssl" if self.tls else "host"
        with open(os.path.join(self.data, "pg_hba.conf"), "w") as rules:
            rules.write(f"{kind} all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n{kind} all all 127.0.0.1/32 trust\n")
        with open(os.path.join(self.data, "postgresql.conf"), "a") as settings:
            settings.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                           f"unix_socket_directories = '{self.folder}'\n"
                           "fsync = off\nshared_buffers = 16MB\nmax_connections = 30\n")
            if self.tls:
                settings.write(f"ssl = on\nssl_cert_file = '{self.folder}/server.pem'\n"
                               f"ssl_key_file = '{self.folder}/server.key'\n")

    def _run(self, program, *args):
        """Run one of PostgreSQL's programs as its own user."""
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*as_postgres, os.path.join(self.bin, program), *args], check=True, capture_output=True,
                       timeout=60)

    def start(self):
        """Start the server, wait until it accepts connections, and create the database `chat`."""
        self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.folder, "log"), "-w", "start")
        admin = psycopg2.connect(self.url(self.admin_sslmode, "postgres"))
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute("CREATE DATABASE chat")
            cursor.execute(f"CREATE ROLE {PASSWORD_USER} LOGIN PASSWORD '{PASSWORD}'")
        admin.close()
        return self

    @property
    def admin_sslmode(self):
        """The sslmode the cluster admits."""
        return "require" if self.tls else "disable"

    def url(self, sslmode, database="chat"):
        """The URL of `database` with `?sslmode=`."""
        return f"postgresql://root@127.0.0.1:{self.port}/{database}?sslmode={sslmode}"

    def encrypted_connections(self):
        """How many connections to `chat` there are, and how many of them use TLS."""
        with psycopg2.connect(self.url("require", "postgres")) as admin, admin.cursor() as cursor:
            cursor.execute("SELECT count(*), count(*) FILTER (WHERE ssl) FROM pg_stat_ssl "
                           "JOIN pg_stat_activity USING (pid) WHERE datname = 'chat'")
            return cursor.fetchone()

    def close(self):
        """Stop the server at once and remove its folder."""
        try:
            self._run("pg_ctl", "-D", self.data, "-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_postgres(certificates):
    """A PostgreSQL of the module's own that admits TLS connections only, with database `chat`."""
    server = TlsPostgres(certificates / "self-signed.pem", certificates / "self-signed.key").start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def plain_postgres():
    """A PostgreSQL of the module's own that does not offer TLS, with database `chat`."""
    server = TlsPostgres().start()
    yield server
    server.close()


def test_sslmode_require_against_a_server_without_tls_fails_and_says_why(make_app, plain_postgres):
    """`?sslmode=require` is passed on to libpq: a server that offers no TLS is refused, with the reason,
    where libpq's default (prefer) would have connected in the clear."""
    assert psycopg2.connect(plain_postgres.url("prefer")).close() is None
    app = make_app(DATABASE_URL=plain_postgres.url("require"), REDIS_URL=None, empty=False)
    result = app.test_cli_runner().invoke(args=["init-db"])
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: the database cannot be used: DATABASE_URL asks for TLS (sslmode), but "
                                     "the server does not offer it")


def test_sslmode_require_in_the_database_url_is_honoured(make_app, start_service, tls_postgres):
    """`?sslmode=require`: init-db creates the tables over TLS, and the service's turns are kept over TLS."""
    app = make_app(DATABASE_URL=tls_postgres.url("require"), REDIS_URL=None, empty=False)
    result = app.test_cli_runner().invoke(args=["init-db"])
    assert result.exit_code == 0, result.output
    service = start_service(DATABASE_URL=tls_postgres.url("require"))
    assert service.run("hello", "c1").status_code == 200
    assert service.status()["database"]["state"] == "ok"
    connections, encrypted = tls_postgres.encrypted_connections()
    assert connections >= 1 and encrypted == connections


def test_a_database_that_requires_tls_says_so_when_the_url_turns_tls_off(make_app, start_service, tls_postgres):
    """`?sslmode=disable` against a TLS-only server: init-db, the log and /status say to add ?sslmode=require."""
    app = make_app(DATABASE_URL=tls_postgres.url("disable"), REDIS_URL=None, empty=False)
    result = app.test_cli_runner().invoke(args=["init-db"])
    assert result.exit_code == 1
    assert f"Error: the database cannot be used: {REQUIRES_TLS}" in result.output
    service = start_service(DATABASE_URL=tls_postgres.url("disable"))
    for n in range(3):
        assert_error(service.run(f"hello {n}", "c1"), 503, "database_unavailable")
    about = service.status_once(lambda about: about["database"]["state"] == "unavailable")
    assert about["database"] == {"state": "unavailable", "backend": "postgresql", "reason": REQUIRES_TLS}
    assert service.messages("The database cannot be used:") == [f"The database cannot be used: {REQUIRES_TLS}"]
    assert public_status(service)["database"] == {"state": "unavailable"}


@pytest.mark.parametrize("url, reason", [
    (lambda pg: pg.url("disable"), REQUIRES_TLS),
    (lambda pg: pg.url("verify-full") + "&sslrootcert=/no/such/ca.pem",
     "certificate verification failed (no CA to check the server's certificate against); add "
     "sslrootcert=<CA file> to DATABASE_URL, or use sslmode=require to encrypt without verifying the certificate"),
    (lambda pg: pg.url("require", "no_such_database"),
     "the database named in DATABASE_URL does not exist on the server"),
    (lambda pg: pg.url("require").replace("root@", f"nobody:{PASSWORD}@"),
     "the user of DATABASE_URL does not exist on the server"),
    (lambda pg: pg.url("require").replace("root@", f"{PASSWORD_USER}:wrong-password@"),
     "authentication failed: check the user name and password in DATABASE_URL"),
    (lambda pg: pg.url("require").replace("root@", f"{PASSWORD_USER}@"),
     "the server asks for a password and DATABASE_URL gives none"),
    (lambda pg: pg.url("requir"),
     "sslmode in DATABASE_URL must be one of disable, allow, prefer, require, verify-ca, verify-full"),
    (lambda pg: f"postgresql://root:{PASSWORD}@127.0.0.1:{free_port()}/chat",
     "connection refused: nothing listens at the host and port of DATABASE_URL (is PostgreSQL running?)"),
    (lambda pg: "postgresql://root@no-such-host.invalid:5432/chat",
     "unknown host: the host name in DATABASE_URL does not resolve"),
], ids=["tls-required", "no-ca-to-verify", "no-database", "no-role", "wrong-password", "no-password", "bad-sslmode",
        "refused", "unknown-host"])
def test_each_database_failure_is_said_in_words_a_user_can_act_on(postgres, tls_postgres, url, reason, caplog):
    """The reason of a failure names its cause and the setting to change, never the password."""
    database = models.open_database(url(tls_postgres), 1, 1)
    try:
        with pytest.raises(models.DatabaseUnavailable) as raised:
            with models.connection():
                models.ping()
    finally:
        database.close_all()
        models.db.initialize(postgres)
    assert str(raised.value) == reason
    assert PASSWORD not in caplog.text and "wrong-password" not in caplog.text
