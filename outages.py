"""Why Redis or the database cannot be used, in a sentence a user can act on, logged once an outage.

A failure is read from its exception (and the ones that led to it: an SSL error under a
redis-py ConnectionError, libpq's message under peewee's OperationalError) and said in our
own words, naming the setting to change. A reason never holds a URL or a password.
"""

import contextlib
import logging
import socket
import ssl
import threading
import time

import redis
from playhouse.pool import MaxConnectionsExceeded

log = logging.getLogger(__name__)

TLS_SETTINGS = ("set REDIS_TLS_VERIFY=false for providers that use self-signed certificates (Heroku Redis), "
                "or REDIS_TLS_CA_FILE to the CA that signed the server's certificate")
TLS_REQUIRED_HINT = "if the server requires TLS, REDIS_URL must start with rediss://"

TABLES_MISSING = ("the tables do not exist: run `.venv/bin/flask --app chat_app init-db` (the Procfile's release "
                  "command)")

# libpq's messages (lowercased), and SQLite's, and what they mean, first match wins.
POSTGRES_REASONS = [
    (("no pg_hba.conf entry", "no encryption"),
     "the server requires TLS (it refuses connections without encryption); add ?sslmode=require to DATABASE_URL"),
    (("no pg_hba.conf entry", "ssl off"),
     "the server requires TLS (it refuses connections without encryption); add ?sslmode=require to DATABASE_URL"),
    (("no pg_hba.conf entry",), "the server's pg_hba.conf admits no connection from this host, user and database"),
    (("server does not support ssl",), "DATABASE_URL asks for TLS (sslmode), but the server does not offer it"),
    (("root certificate file",),
     "certificate verification failed (no CA to check the server's certificate against); add sslrootcert=<CA file> "
     "to DATABASE_URL, or use sslmode=require to encrypt without verifying the certificate"),
    (("certificate verify failed",),
     "certificate verification failed; add sslrootcert=<CA file> to DATABASE_URL, or use sslmode=require to "
     "encrypt without verifying the certificate"),
    (("invalid sslmode value",),
     "sslmode in DATABASE_URL must be one of disable, allow, prefer, require, verify-ca, verify-full"),
    (("authentication failed",), "authentication failed: check the user name and password in DATABASE_URL"),
    (("no password supplied",), "the server asks for a password and DATABASE_URL gives none"),
    (("connection refused",),
     "connection refused: nothing listens at the host and port of DATABASE_URL (is PostgreSQL running?)"),
    (("could not translate host name",), "unknown host: the host name in DATABASE_URL does not resolve"),
    (('role "', "does not exist"), "the user of DATABASE_URL does not exist on the server"),
    (('database "', "does not exist"), "the database named in DATABASE_URL does not exist on the server"),
    (('relation "', "does not exist"), TABLES_MISSING),
    (("too many clients",),
     "the server has no connection slots left; lower DATABASE_POOL_SIZE (each worker of each instance keeps "
     "up to that many)"),
    (("remaining connection slots",),
     "the server has no connection slots left; lower DATABASE_POOL_SIZE (each worker of each instance keeps "
     "up to that many)"),
    (("starting up",), "PostgreSQL is starting up"),
    (("shutting down",), "PostgreSQL is shutting down"),
    (("recovery mode",), "PostgreSQL is recovering from a crash"),
    (("timeout expired",), "timed out: the server did not answer in time"),
    (("server closed the connection",), "the server closed the connection"),
    (("terminating connection",), "the server closed the connection"),
    (("connection already closed",), "the connection was closed"),
    (("unable to open database file",),
     "cannot open the SQLite file of DATABASE_URL (does its folder exist, and may the service write there?)"),
    (("database is locked",), "the SQLite file of DATABASE_URL is locked by another process"),
    (("no such table",), TABLES_MISSING),
]

QUIET_SECONDS = 60

# OpenSSL's reason codes that mean the other end does not speak TLS.
NOT_TLS = {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"}


class Unavailable(Exception):
    """A part the service depends on cannot be used; str() says why, in a sentence a user can act on."""


class Outage:
    """Whether a part (Redis, the database) can be used now, and if not, why.

    The first failure of an outage is logged with its reason, and the first success after it;
    the failures in between are not (their reason is kept, for /status). A part that flaps says
    so once a minute at most: an outage that begins within QUIET_SECONDS of the last one logged
    is logged at its first failure once that minute is up, if it still goes on; one that ends
    before is never logged, nor its end.
    """

    def __init__(self, part, while_down=""):
        """An outage tracker for `part` ("Redis"); `while_down` says what the service does meanwhile."""
        self.part = part
        self.while_down = while_down
        self.reason = None
        self._logged = False  # whether the current outage was logged
        self._logged_at = -QUIET_SECONDS
        self._said_elsewhere = 0  # blocks in which the caller says the failures itself
        self._mutex = threading.Lock()

    def failed(self, reason):
        """The part failed for `reason`: logged if the outage was not, unless the last was logged just now."""
        with self._mutex:
            if self.reason is None:
                self._logged = False
            self.reason = reason
            quiet = self._said_elsewhere or time.monotonic() - self._logged_at < QUIET_SECONDS
            said = not self._logged and not quiet
            if said:
                self._logged, self._logged_at = True, time.monotonic()
        if said:
            log.error("%s cannot be used: %s%s", self.part, reason, f". {self.while_down}" if self.while_down else "")

    @contextlib.contextmanager
    def said_by_caller(self):
        """Log no failure in the block: the caller says it (a command's `Error:` line)."""
        with self._mutex:
            self._said_elsewhere += 1
        try:
            yield
        finally:
            with self._mutex:
                self._said_elsewhere -= 1

    def recovered(self):
        """The part answered: logged once, if its outage was."""
        if self.reason is None:
            return
        with self._mutex:
            said = self.reason is not None and self._logged
            self.reason, self._logged = None, False
        if said:
            log.warning("%s is reachable again", self.part)


def causes(failure):
    """The failure and the exceptions that led to it, outermost first."""
    chain = []
    while failure is not None and all(failure is not seen for seen in chain):
        chain.append(failure)
        failure = failure.__cause__ or failure.__context__
    return chain


def first(chain, kind):
    """The first exception of `chain` that is a `kind`, else None."""
    return next((failure for failure in chain if isinstance(failure, kind)), None)


def redis_reason(failure):
    """Why Redis failed, in a sentence a user can act on."""
    chain = causes(failure)
    if first(chain, redis.AuthenticationError):
        return "authentication failed: check the password (and user name) in REDIS_URL"
    unverified = first(chain, ssl.SSLCertVerificationError)
    if unverified is not None:
        return f"certificate verification failed ({unverified.verify_message or 'no detail'}); {TLS_SETTINGS}"
    return _tls_reason(chain) or _network_reason(chain, "REDIS_URL", "Redis did not answer within a second") \
        or _answer_reason(failure)


def _tls_reason(chain):
    """What went wrong with TLS, if that is what failed."""
    handshake = first(chain, ssl.SSLError)
    if handshake is not None:
        code = getattr(handshake, "reason", None) or type(handshake).__name__
        if code in NOT_TLS:
            return f"TLS failed ({code}): the port of the rediss:// URL does not seem to speak TLS"
        return f"TLS failed ({code})"
    timeout = first(chain, (TimeoutError, socket.timeout))
    if timeout is not None and "handshake" in str(timeout):
        return ("the TLS handshake timed out: the server does not seem to speak TLS on that port "
                "(a plain port needs a redis:// URL)")
    unreadable = first(chain, (FileNotFoundError, PermissionError, IsADirectoryError))
    if unreadable is not None:
        return f"a TLS file cannot be read ({unreadable.strerror}); check REDIS_TLS_CA_FILE"
    return None


def _network_reason(chain, setting, silence):
    """What went wrong on the way to the server, if that is what failed."""
    if first(chain, ConnectionRefusedError):
        return f"connection refused: nothing listens at the host and port of {setting}"
    if first(chain, socket.gaierror):
        return f"unknown host: the host name in {setting} does not resolve"
    if first(chain, ConnectionResetError):  # what a TLS port answers to a plain client
        return f"the server reset the connection; {TLS_REQUIRED_HINT}" if setting == "REDIS_URL" \
            else "the server reset the connection"
    if any("closed by server" in str(failure) for failure in chain):
        return "the server closed the connection"
    if first(chain, (redis.TimeoutError, TimeoutError, socket.timeout)):
        return f"timed out: {silence}"
    failed = first(chain, OSError)
    if failed is not None and failed.strerror:
        return f"cannot connect ({failed.strerror.lower()})"
    return None


def _answer_reason(failure):
    """What Redis answered, when it answered with an error."""
    if isinstance(failure, redis.BusyLoadingError):
        return "Redis is still loading its data into memory"
    if isinstance(failure, redis.ReadOnlyError):
        return "REDIS_URL names a read-only replica; point it at the primary"
    if isinstance(failure, redis.exceptions.NoPermissionError):
        return "the user of REDIS_URL may not run a command this service needs (NOPERM)"
    if isinstance(failure, redis.exceptions.OutOfMemoryError):
        return "Redis is out of memory (maxmemory) and refuses writes"
    if isinstance(failure, redis.ResponseError):  # Redis's own words, which hold no secret
        return f"Redis answered an error: {str(failure)[:200]}"
    return f"Redis failed ({type(failure).__name__})"


def database_reason(failure, password=None):
    """Why the database failed, in a sentence a user can act on (`password` is never repeated)."""
    if isinstance(failure, MaxConnectionsExceeded):
        return ("every pooled connection of this worker is in use (DATABASE_POOL_SIZE) and none came free "
                "within DATABASE_POOL_TIMEOUT")
    message = str(failure).lower()
    for words, reason in POSTGRES_REASONS:
        if all(word in message for word in words):
            return reason
    network = _network_reason(causes(failure), "DATABASE_URL", "no answer within DATABASE_TIMEOUT_SECONDS")
    if network is not None:
        return network
    said = (str(failure).strip().splitlines() or [""])[0][:200]
    if password:
        said = said.replace(password, "***")
    return f"{type(failure).__name__}: {said}" if said else type(failure).__name__
