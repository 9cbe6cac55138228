"""Copies of conversations' recent messages: in Redis when `REDIS_URL` is set, else in this process.

A copy is only ever a copy of the database: each carries the conversation's version, and a
turn uses it only when the database holds that same version. A miss (expired, evicted,
flushed, stale, Redis down) is filled from the database.
"""

import json
import logging
import threading
import time
from typing import Protocol, runtime_checkable

import redis

from redis_link import Pending

log = logging.getLogger(__name__)

KEY = "chat:conversation:{}"
MEMORY_ENTRIES = 10000


def encode(version, messages):
    """The cached form of a conversation's recent messages at `version`."""
    return json.dumps({"version": version, "messages": messages}, ensure_ascii=False)


def decode(raw):
    """The (version, messages) of a cached conversation."""
    value = json.loads(raw)
    return value["version"], value["messages"]


@runtime_checkable
class ConversationCache(Protocol):
    """What a turn needs of the cache.

    A conversation is named by `redis_link.scope(user, conversation_id)`; `trip` is the round
    trip a command rides in.
    """

    backend: str

    def read(self, name, trip) -> Pending:
        """The raw cached conversation (None if not cached, or if the cache failed)."""

    def write(self, name, raw, trip) -> Pending:
        """Cache a conversation for the TTL (a failure is logged: a miss is filled later)."""

    def drop(self, names):
        """Forget the cached copies of conversations (a failure is logged: they expire)."""

    def ping(self):
        """Raise if the cache cannot be reached."""


def _missing(failure):
    """A failed read is a miss."""
    log.debug("cache unavailable, reading from the database: %s", type(failure).__name__)


def _not_written(failure):
    """A failed write leaves an older copy, which the version check refuses."""
    log.debug("cache unavailable, not updated: %s", type(failure).__name__)


class RedisCache:
    """Conversations cached in Redis, shared by every process of the service."""

    backend = "redis"

    def __init__(self, link, ttl):
        """Cache through the Redis `link`, each copy for `ttl` seconds."""
        self.link = link
        self.ttl = ttl

    def read(self, name, trip):
        """The raw cached conversation (None if not cached, or if Redis failed)."""
        return trip.add("GET", KEY.format(name), otherwise=_missing)

    def write(self, name, raw, trip):
        """Cache a conversation for the TTL."""
        return trip.add("SET", KEY.format(name), raw, "EX", self.ttl, otherwise=_not_written)

    def drop(self, names):
        """Forget the cached copies of conversations (left to expire if Redis is away now)."""
        if not names:
            return
        try:
            self.link.call(self.link.client.delete, *[KEY.format(c) for c in names])
        except redis.RedisError as exc:
            # Harmless: a cached copy is used only while the database holds its version.
            log.debug("cache unavailable, cached copies left to expire: %s", type(exc).__name__)

    def ping(self):
        """Raise Unavailable, saying why, if Redis cannot be reached."""
        self.link.ping()


class MemoryCache:
    """Conversations cached in this process: the embedded default for one process."""

    backend = "memory"

    def __init__(self, ttl):
        """An empty cache whose entries live `ttl` seconds."""
        self.ttl = ttl
        self._entries = {}
        self._mutex = threading.Lock()

    def read(self, name, trip=None):
        """The raw cached conversation, or None."""
        entry = self._entries.get(name)
        if entry is None or entry[1] < time.monotonic():
            return Pending.done(None)
        return Pending.done(entry[0])

    def write(self, name, raw, trip=None):
        """Cache a conversation for the TTL."""
        with self._mutex:
            if len(self._entries) >= MEMORY_ENTRIES:
                self._evict()
            self._entries[name] = (raw, time.monotonic() + self.ttl)
        return Pending.done(True)

    def _evict(self):
        """Make room: drop expired entries, then the oldest half."""
        now = time.monotonic()
        self._entries = {k: v for k, v in self._entries.items() if v[1] >= now}
        if len(self._entries) >= MEMORY_ENTRIES:
            by_expiry = sorted(self._entries, key=lambda k: self._entries[k][1])
            for key in by_expiry[:len(by_expiry) // 2]:
                del self._entries[key]

    def drop(self, names):
        """Forget the cached copies of conversations."""
        with self._mutex:
            for name in names:
                self._entries.pop(name, None)

    def ping(self):
        """Always reachable."""
