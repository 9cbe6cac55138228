"""The conversation cache and turn locks: Redis when `REDIS_URL` is set, else this process's memory.

The cache is only ever a copy of the database: each entry carries the conversation's
version, and a turn uses it only when the database holds that same version. A miss
(expired, evicted, flushed, stale, Redis down) is filled from the database.
"""

import json
import logging
import secrets
import threading
import time

import redis

log = logging.getLogger(__name__)

KEY = "chat:conversation:{}"
LOCK_KEY = "chat:turn-lock:{}"
RATE_KEY = "chat:rate:{}:{}"
STOP_CHANNEL = "chat:stop"
RETRY_AFTER_FAILURE = 1.0
MEMORY_ENTRIES = 10000

# Delete a lock only if it still holds the token of the turn that took it.
_RELEASE_IF_OURS = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

# Extend a lock only if it still holds the token of the turn that took it.
_EXTEND_IF_OURS = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


def encode(version, messages):
    """The cached form of a conversation's recent messages at `version`."""
    return json.dumps({"version": version, "messages": messages}, ensure_ascii=False)


def decode(raw):
    """The (version, messages) of a cached conversation."""
    value = json.loads(raw)
    return value["version"], value["messages"]


class CacheDown(redis.ConnectionError):
    """Redis failed a moment ago; not tried again until RETRY_AFTER_FAILURE has passed."""


class RedisCache:
    """Conversations cached in Redis, shared by every process of the service."""

    backend = "redis"

    def __init__(self, url, ttl):
        """Connect lazily to the Redis at `url`, never waiting on it more than a second."""
        self.client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=1,
                                           socket_connect_timeout=1, health_check_interval=30)
        self.ttl = ttl
        self.url = url
        self._release_if_ours = self.client.register_script(_RELEASE_IF_OURS)
        self._extend_if_ours = self.client.register_script(_EXTEND_IF_OURS)
        self._retry_at = 0.0
        self._orphans = set()
        self.fallback_locks = MemoryLocks()
        self.fallback_counter = MemoryCounter()

    def _call(self, operation, *args, **kwargs):
        """Run a Redis operation, failing fast for a second after Redis failed."""
        if time.monotonic() < self._retry_at:
            raise CacheDown("Redis failed a moment ago")
        try:
            if self._orphans:
                self._release_orphans()
            return operation(*args, **kwargs)
        except redis.RedisError:
            self._retry_at = time.monotonic() + RETRY_AFTER_FAILURE
            raise

    def _release_orphans(self):
        """Release the locks whose taking or release failed while Redis was away."""
        for key, token in list(self._orphans):
            self._release_if_ours(keys=[key], args=[token])
            self._orphans.discard((key, token))

    def release(self, key, token):
        """Release a lock if it is still ours; retried once Redis is back if this fails."""
        try:
            self._call(self._release_if_ours, keys=[key], args=[token])
        except redis.RedisError as exc:
            log.warning("could not release turn lock now: %s", type(exc).__name__)
            self._orphans.add((key, token))

    def get(self, conversation_id):
        """The raw cached conversation, or None."""
        return self._call(self.client.get, KEY.format(conversation_id))

    def put(self, conversation_id, raw):
        """Cache a conversation for the TTL."""
        self._call(self.client.set, KEY.format(conversation_id), raw, ex=self.ttl)

    def keep(self, conversation_id, raw, lock):
        """Cache a conversation as its turn saved it and let the next turn in, in one round trip."""
        if not isinstance(lock, RedisTurnLock):  # taken in this process while Redis was away
            self._put_or_warn(conversation_id, raw)
            lock.release()
            return
        lock.released = True
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.execute_command("SET", KEY.format(conversation_id), raw, "EX", self.ttl)
                pipe.eval(_RELEASE_IF_OURS, 1, lock.key, lock.token)
                self._call(pipe.execute)
        except redis.RedisError as exc:
            log.warning("cache unavailable, not updated: %s", type(exc).__name__)
            self._orphans.add((lock.key, lock.token))

    def _put_or_warn(self, conversation_id, raw):
        """Cache a conversation if Redis answers; a miss later is filled from the database."""
        try:
            self.put(conversation_id, raw)
        except redis.RedisError as exc:
            log.warning("cache unavailable, not updated: %s", type(exc).__name__)

    def hold(self, conversation_id, ttl, holder=""):
        """Take the conversation's turn lock and read its cached copy in one round trip.

        Returns (lock, or None if another turn holds it; the cached value, or None). The lock
        is shared by every process; `holder` (say "stream alice") is kept with it, for holder_of.
        """
        key, token = LOCK_KEY.format(conversation_id), f"{secrets.token_hex(16)} {holder}"
        try:
            with self.client.pipeline(transaction=False) as pipe:
                # The raw command: redis-py's set() inspects its arguments on every call.
                pipe.execute_command("SET", key, token, "NX", "PX", int(ttl * 1000))
                pipe.get(KEY.format(conversation_id))
                taken, raw = self._call(pipe.execute)
        except redis.RedisError as exc:
            if not isinstance(exc, CacheDown):
                self._orphans.add((key, token))  # Redis may still carry the SET out later
            log.warning("cache unavailable, locking in this process only: %s", type(exc).__name__)
            return self.fallback_locks.lock(conversation_id, ttl, holder), None
        return (RedisTurnLock(self, key, token) if taken else None), raw

    def lock(self, conversation_id, ttl, holder=""):
        """Hold the conversation for one turn, across every process: a lock, or None if it is held."""
        return self.hold(conversation_id, ttl, holder)[0]

    def holder_of(self, conversation_id):
        """Who holds the conversation now (the `holder` given to lock), or None."""
        try:
            token = self._call(self.client.get, LOCK_KEY.format(conversation_id))
        except redis.RedisError:
            return self.fallback_locks.holder_of(conversation_id)
        return None if token is None else token.partition(" ")[2]

    def drop(self, conversation_ids):
        """Forget the cached copies of conversations (later, if Redis is away now)."""
        if not conversation_ids:
            return
        try:
            self._call(self.client.delete, *[KEY.format(c) for c in conversation_ids])
        except redis.RedisError as exc:
            # Harmless: a cached copy is used only while the database holds its version.
            log.warning("cache unavailable, cached copies left to expire: %s", type(exc).__name__)

    def publish_stop(self, conversation_id):
        """Ask whichever process streams the conversation to stop."""
        self._call(self.client.publish, STOP_CHANNEL, conversation_id)

    def listen_for_stops(self, on_stop):
        """Call `on_stop(conversation_id)` for every stop published, from a background thread."""
        listener = redis.Redis(connection_pool=redis.ConnectionPool.from_url(
            self.url, decode_responses=True, socket_connect_timeout=1, health_check_interval=30))
        threading.Thread(target=_receive_stops, args=(listener, on_stop), daemon=True).start()

    def count_request(self, user, window):
        """Count a request of `user` in the current window of `window` seconds; the count so far."""
        slot = int(time.time() // window)
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.incr(RATE_KEY.format(user, slot))
                pipe.expire(RATE_KEY.format(user, slot), window + 1)
                return self._call(pipe.execute)[0]
        except redis.RedisError:
            return self.fallback_counter.count(user, window)

    def ping(self):
        """Raise if Redis cannot be reached."""
        self._call(self.client.ping)


def _receive_stops(listener, on_stop):
    """Deliver stop signals for ever, reconnecting after Redis failures."""
    while True:
        try:
            pubsub = listener.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(STOP_CHANNEL)
            for message in pubsub.listen():
                on_stop(message["data"])
        except redis.RedisError:
            time.sleep(RETRY_AFTER_FAILURE)


class RedisTurnLock:
    """A turn's hold on a conversation: a Redis key holding the turn's token, with an expiry."""

    def __init__(self, conversation_cache, key, token):
        """A held lock."""
        self.cache, self.key, self.token = conversation_cache, key, token
        self.released = False

    def extend(self, ttl):
        """Keep holding the conversation for `ttl` more seconds."""
        try:
            self.cache._call(self.cache._extend_if_ours, keys=[self.key],
                             args=[self.token, int(ttl * 1000)])
        except redis.RedisError as exc:
            log.warning("could not extend turn lock: %s", type(exc).__name__)

    def release(self):
        """Let the next turn in (once)."""
        if not self.released:
            self.released = True
            self.cache.release(self.key, self.token)


class MemoryLocks:
    """Turn locks in this process, with expiry."""

    def __init__(self):
        """No conversation held."""
        self._holders = {}
        self._mutex = threading.Lock()

    def lock(self, conversation_id, ttl, holder=""):
        """Hold the conversation for one turn: a lock, or None if it is held."""
        with self._mutex:
            if self.holder_of(conversation_id) is not None:
                return None
            token = f"{secrets.token_hex(16)} {holder}"
            self._holders[conversation_id] = (token, time.monotonic() + ttl)
        return MemoryTurnLock(self, conversation_id, token)

    def holder_of(self, conversation_id):
        """Who holds the conversation now (the `holder` given to lock), or None."""
        held = self._holders.get(conversation_id)
        if held is None or held[1] <= time.monotonic():
            return None
        return held[0].partition(" ")[2]

    def extend(self, conversation_id, token, ttl):
        """Hold on for `ttl` more seconds, if still the holder."""
        with self._mutex:
            if self._holders.get(conversation_id, (None,))[0] == token:
                self._holders[conversation_id] = (token, time.monotonic() + ttl)

    def release(self, conversation_id, token):
        """Let go, if still the holder."""
        with self._mutex:
            if self._holders.get(conversation_id, (None,))[0] == token:
                del self._holders[conversation_id]


class MemoryTurnLock:
    """A turn's hold on a conversation in this process."""

    def __init__(self, locks, conversation_id, token):
        """A held lock."""
        self.locks, self.conversation_id, self.token = locks, conversation_id, token

    def extend(self, ttl):
        """Keep holding the conversation for `ttl` more seconds."""
        self.locks.extend(self.conversation_id, self.token, ttl)

    def release(self):
        """Let the next turn in."""
        self.locks.release(self.conversation_id, self.token)


class MemoryCache:
    """Conversations cached in this process: the embedded default for one process."""

    backend = "memory"

    def __init__(self, ttl):
        """An empty cache whose entries live `ttl` seconds."""
        self.ttl = ttl
        self._entries = {}
        self._mutex = threading.Lock()
        self.locks = MemoryLocks()
        self.counter = MemoryCounter()
        self._on_stop = None

    def get(self, conversation_id):
        """The raw cached conversation, or None."""
        entry = self._entries.get(conversation_id)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def keep(self, conversation_id, raw, lock):
        """Cache a conversation as its turn saved it and let the next turn in."""
        self.put(conversation_id, raw)
        lock.release()

    def put(self, conversation_id, raw):
        """Cache a conversation for the TTL."""
        with self._mutex:
            if len(self._entries) >= MEMORY_ENTRIES:
                self._evict()
            self._entries[conversation_id] = (raw, time.monotonic() + self.ttl)

    def _evict(self):
        """Make room: drop expired entries, then the oldest half."""
        now = time.monotonic()
        self._entries = {k: v for k, v in self._entries.items() if v[1] >= now}
        if len(self._entries) >= MEMORY_ENTRIES:
            by_expiry = sorted(self._entries, key=lambda k: self._entries[k][1])
            for key in by_expiry[:len(by_expiry) // 2]:
                del self._entries[key]

    def lock(self, conversation_id, ttl, holder=""):
        """Hold the conversation for one turn: a lock, or None if it is held."""
        return self.locks.lock(conversation_id, ttl, holder)

    def hold(self, conversation_id, ttl, holder=""):
        """(the conversation's turn lock, or None if it is held; its cached copy, or None)."""
        return self.lock(conversation_id, ttl, holder), self.get(conversation_id)

    def holder_of(self, conversation_id):
        """Who holds the conversation now (the `holder` given to lock), or None."""
        return self.locks.holder_of(conversation_id)

    def drop(self, conversation_ids):
        """Forget the cached copies of conversations."""
        with self._mutex:
            for conversation_id in conversation_ids:
                self._entries.pop(conversation_id, None)

    def publish_stop(self, conversation_id):
        """Stop the conversation's stream (this process is the only one)."""
        if self._on_stop is not None:
            self._on_stop(conversation_id)

    def listen_for_stops(self, on_stop):
        """Call `on_stop(conversation_id)` for every stop published."""
        self._on_stop = on_stop

    def count_request(self, user, window):
        """Count a request of `user` in the current window of `window` seconds; the count so far."""
        return self.counter.count(user, window)

    def ping(self):
        """Always reachable."""


class MemoryCounter:
    """Requests per user in fixed windows, in this process."""

    def __init__(self):
        """No requests counted."""
        self._counts = {}
        self._mutex = threading.Lock()

    def count(self, user, window):
        """Count a request of `user` in the current window; the count so far."""
        slot = int(time.time() // window)
        with self._mutex:
            if len(self._counts) > MEMORY_ENTRIES:
                self._counts = {k: v for k, v in self._counts.items() if k[1] == slot}
            self._counts[(user, slot)] = self._counts.get((user, slot), 0) + 1
            return self._counts[(user, slot)]


def make_cache(redis_url, ttl):
    """The cache the configuration asks for."""
    return RedisCache(redis_url, ttl) if redis_url else MemoryCache(ttl)
