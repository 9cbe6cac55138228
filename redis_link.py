"""The process's one Redis client: it fails fast after a failure, and sends several commands in one round trip.

The conversation cache (cache.py) and the coordination between processes (coordination.py)
both talk to Redis through a link. A turn's commands for both ride in the same round trip:
each module adds its commands to a `RoundTrip` and gets a `Pending` back, whose value is
there once the trip is sent. Without Redis (the embedded defaults), `LocalTrip` stands in:
the in-process backends answer at once and add nothing to it.
"""

import logging
import time
from urllib.parse import quote, urlsplit

import redis

from config import REDIS_POOL_SIZE, ConfigError
from outages import Outage, Unavailable, redis_reason

log = logging.getLogger(__name__)

RETRY_AFTER_FAILURE = 1.0
BLOCKING_TIMEOUT = 5.0
# Failures that make Redis unusable (an outage), as opposed to an error answered to one command.
UNUSABLE = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.NoPermissionError)
# Failures to reach Redis at all (refused, timed out, authentication, TLS), after which the next
# commands would fail too: the process stops asking for a second. An error answered to one
# command (WRONGTYPE, NOSCRIPT, even NOPERM) says nothing of the next.
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)


def scope(user, conversation_id):
    """The name of a user's conversation in what processes share (Redis keys, in-process tables).

    Conversation ids are per user. The user is quoted, so no ':' in it can make two names meet.
    """
    return f"{quote(user, safe='')}:{conversation_id}"


class RedisDown(redis.ConnectionError):
    """Redis failed a moment ago (the message says why); not tried again until RETRY_AFTER_FAILURE has passed."""


class Pending:
    """The answer to one command of a round trip: its value once sent, or what to do if it failed."""

    asked = None  # what the command asks for, where the caller needs it before the trip is sent

    def __init__(self, then=None, otherwise=None):
        """Waiting for the answer; `then` turns the reply into the value, `otherwise` a failure."""
        self._then, self._otherwise = then, otherwise
        self._value, self._failure = None, None

    @classmethod
    def done(cls, value):
        """A value that needed no round trip."""
        pending = cls()
        pending._value = value
        return pending

    def resolve(self, reply):
        """The command succeeded with `reply`."""
        self._value = self._then(reply) if self._then else reply

    def fail(self, failure):
        """The round trip failed."""
        self._failure = failure
        if self._otherwise is not None:
            self._value = self._otherwise(failure)

    @property
    def value(self):
        """The command's value; raises the round trip's failure if nothing stands in for it."""
        if self._failure is not None and self._otherwise is None:
            raise self._failure
        return self._value


class RoundTrip:
    """Commands sent to Redis together, in one pipeline without a transaction."""

    def __init__(self, link):
        """An empty round trip over `link`."""
        self.link = link
        self._pipe = link.client.pipeline(transaction=False)
        self._pending = []

    def add(self, *command, then=None, otherwise=None):
        """Queue a raw command (redis-py's helpers inspect their arguments on every call)."""
        self._pipe.execute_command(*command)
        pending = Pending(then, otherwise)
        self._pending.append(pending)
        return pending

    def send(self):
        """Send the queued commands and hand each its answer (or the failure)."""
        if not self._pending:
            return
        try:
            replies = self.link.call(self._pipe.execute, raise_on_error=False)
        except redis.RedisError as exc:
            for pending in self._pending:
                pending.fail(exc)
        else:
            for pending, reply in zip(self._pending, replies):
                if isinstance(reply, redis.RedisError):
                    pending.fail(reply)
                else:
                    pending.resolve(reply)
        finally:
            self._pipe.reset()
            self._pending = []

    def __enter__(self):
        """Queue commands in the block; they are sent when it ends."""
        return self

    def __exit__(self, kind, exc, traceback):
        """Send the commands, unless the block failed."""
        if kind is None:
            self.send()


class LocalTrip:
    """The round trip of the in-process backends: they answer at once, so there is nothing to send."""

    def send(self):
        """Nothing to send."""

    def __enter__(self):
        """The in-process backends answer inside the block."""
        return self

    def __exit__(self, kind, exc, traceback):
        """Nothing to send."""


def tls_options(url, verify=True, ca_file=None):
    """redis-py's TLS arguments for `url`: none for redis://; for rediss://, the certificate checks chosen.

    The URL's own parameters (`?ssl_cert_reqs=none`) win over these: redis-py applies them last.
    """
    if not url.startswith("rediss://"):
        if ca_file or not verify:
            log.warning("REDIS_TLS_VERIFY and REDIS_TLS_CA_FILE apply to rediss:// URLs only; "
                        "REDIS_URL is not one, so its connections are not encrypted")
        return {}
    options = {"ssl_cert_reqs": "required" if verify else "none"}
    if ca_file:
        options["ssl_ca_certs"] = ca_file
    return options


def client_of(url, pool_size, **options):
    """redis-py's client of REDIS_URL on at most `pool_size` connections, a caller waiting (up to the socket timeout)
    for one to be free; ConfigError, without repeating the URL, if the URL cannot be read.

    redis-py's own pool fails a caller past its hundredth at once (MaxConnectionsError), which a
    burst of turns in one gevent worker reaches and which would read as Redis being down.
    """
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError("REDIS_URL must start with redis://, rediss:// or unix://")
    try:
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=pool_size,
                                                      timeout=options.get("socket_timeout"), **options)
    except ValueError as exc:  # a port or a query parameter redis-py cannot read: its words name which
        raise ConfigError(f"REDIS_URL cannot be read: {exc}") from None
    return redis.Redis(connection_pool=pool)


class RedisLink:
    """The Redis client of a process, never waiting on Redis more than a second.

    Its `outage` says why Redis cannot be used, logged once an outage (outages.py).
    """

    def __init__(self, url, verify=True, ca_file=None, pool_size=REDIS_POOL_SIZE):
        """Connect lazily to the Redis at `url`, checking a rediss:// server's certificate as chosen, on at most
        `pool_size` connections for commands."""
        self.url = url
        self.options = {"decode_responses": True, "socket_connect_timeout": 1, "health_check_interval": 30,
                        **tls_options(url, verify, ca_file)}
        self.client = client_of(url, pool_size, socket_timeout=1, **self.options)
        self.outage = Outage("Redis")
        self._retry_at = 0.0
        self._blocking = None

    def call(self, operation, *args, **kwargs):
        """Run a Redis operation, failing fast for a second after Redis could not be reached."""
        if time.monotonic() < self._retry_at:
            raise RedisDown(self.outage.reason or "Redis failed a moment ago")
        try:
            answer = operation(*args, **kwargs)
        except redis.RedisError as exc:
            if isinstance(exc, UNREACHABLE):
                self._retry_at = time.monotonic() + RETRY_AFTER_FAILURE
            if isinstance(exc, UNUSABLE):
                self.outage.failed(redis_reason(exc))
            raise
        self.outage.recovered()
        return answer

    def round_trip(self):
        """A round trip to fill with commands."""
        return RoundTrip(self)

    def script(self, source):
        """A Lua script, sent by its hash."""
        return self.client.register_script(source)

    def listener(self):
        """A client of its own for a subscription, which holds its connection for ever (same TLS settings)."""
        return redis.Redis(connection_pool=redis.ConnectionPool.from_url(self.url, **self.options))

    def blocking(self):
        """A client for reads that wait (XREAD BLOCK up to a second): a longer timeout, and failures that
        do not make the rest of the process give up on Redis for a second."""
        if self._blocking is None:
            self._blocking = redis.Redis.from_url(self.url, socket_timeout=BLOCKING_TIMEOUT, **self.options)
        return self._blocking

    def ping(self):
        """Raise Unavailable, saying why, if Redis cannot be reached."""
        try:
            self.call(self.client.ping)
        except RedisDown as exc:
            raise Unavailable(str(exc)) from None
        except redis.RedisError as exc:
            raise Unavailable(redis_reason(exc)) from None
