"""What the processes of the service agree on: who holds a conversation, stop signals, request counts.

In Redis when `REDIS_URL` is set, so every process and instance shares them; else in this
process (the embedded defaults run one process). While Redis is away, conversations are
held in the process only, and requests are counted per process.
"""

import logging
import secrets
import threading
import time
from typing import Protocol, runtime_checkable

import redis

from redis_link import RETRY_AFTER_FAILURE, LocalTrip, Pending, RedisDown

log = logging.getLogger(__name__)

LOCK_KEY = "chat:turn-lock:{}"
RATE_KEY = "chat:rate:{}:{}"
STOP_CHANNEL = "chat:stop"
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


@runtime_checkable
class Lease(Protocol):
    """A turn's hold on a conversation."""

    def extend(self, ttl):
        """Keep holding the conversation for `ttl` more seconds."""

    def release(self, trip=None):
        """Let the next turn in (once), in `trip` if given."""


@runtime_checkable
class Coordination(Protocol):
    """What the processes share; `trip` is the round trip a command rides in."""

    backend: str

    def take(self, conversation_id, ttl, holder, trip) -> Pending:
        """Hold the conversation for one turn: a Lease, or None if another holds it."""

    def holder_of(self, conversation_id):
        """Who holds the conversation now (the `holder` given to take), or None."""

    def publish_stop(self, conversation_id):
        """Ask whichever process streams the conversation to stop."""

    def listen_for_stops(self, on_stop):
        """Call `on_stop(conversation_id)` for every stop published."""

    def count_request(self, user, window):
        """Count a request of `user` in the current window of `window` seconds; the count so far."""


class RedisCoordination:
    """Leases, stop signals and request counts in Redis, shared by every process and instance."""

    backend = "redis"

    def __init__(self, link):
        """Coordinate through the Redis `link`; in this process while Redis is away."""
        self.link = link
        self._release_if_ours = link.script(_RELEASE_IF_OURS)
        self._extend_if_ours = link.script(_EXTEND_IF_OURS)
        self._orphans = set()
        self.fallback = MemoryCoordination()

    def take(self, conversation_id, ttl, holder, trip):
        """Hold the conversation for one turn, across every process: a Lease, or None if it is held.

        `holder` (say "stream alice") is kept with the lease, for holder_of.
        """
        key, token = LOCK_KEY.format(conversation_id), f"{secrets.token_hex(16)} {holder}"
        self._release_orphans()

        def held_here(failure):
            """Redis failed: hold the conversation in this process only."""
            if not isinstance(failure, RedisDown):
                self._orphans.add((key, token))  # Redis may still carry the SET out later
            log.warning("cache unavailable, locking in this process only: %s", type(failure).__name__)
            return self.fallback.take(conversation_id, ttl, holder, LocalTrip()).value

        return trip.add("SET", key, token, "NX", "PX", int(ttl * 1000),
                        then=lambda taken: RedisLease(self, key, token) if taken else None,
                        otherwise=held_here)

    def _release_orphans(self):
        """Release the leases whose taking or release failed while Redis was away."""
        for key, token in list(self._orphans):
            try:
                self.link.call(self._release_if_ours, keys=[key], args=[token])
            except redis.RedisError:
                return
            self._orphans.discard((key, token))

    def release(self, key, token, trip=None):
        """Release a lease if it is still ours; retried once Redis is back if this fails."""
        def orphaned(failure):
            """Release it later."""
            log.warning("could not release turn lock now: %s", type(failure).__name__)
            self._orphans.add((key, token))

        if trip is not None:
            trip.add("EVAL", _RELEASE_IF_OURS, 1, key, token, otherwise=orphaned)
            return
        try:
            self.link.call(self._release_if_ours, keys=[key], args=[token])
        except redis.RedisError as exc:
            orphaned(exc)

    def extend(self, key, token, ttl):
        """Hold on for `ttl` more seconds, if still the holder."""
        try:
            self.link.call(self._extend_if_ours, keys=[key], args=[token, int(ttl * 1000)])
        except redis.RedisError as exc:
            log.warning("could not extend turn lock: %s", type(exc).__name__)

    def holder_of(self, conversation_id):
        """Who holds the conversation now (the `holder` given to take), or None."""
        try:
            token = self.link.call(self.link.client.get, LOCK_KEY.format(conversation_id))
        except redis.RedisError:
            return self.fallback.holder_of(conversation_id)
        return None if token is None else token.partition(" ")[2]

    def publish_stop(self, conversation_id):
        """Ask whichever process streams the conversation to stop."""
        self.link.call(self.link.client.publish, STOP_CHANNEL, conversation_id)

    def listen_for_stops(self, on_stop):
        """Call `on_stop(conversation_id)` for every stop published, from a background thread."""
        listener = self.link.listener()
        threading.Thread(target=_receive_stops, args=(listener, on_stop), daemon=True).start()

    def count_request(self, user, window):
        """Count a request of `user` in the current window of `window` seconds; the count so far."""
        key = RATE_KEY.format(user, int(time.time() // window))
        trip = self.link.round_trip()
        count = trip.add("INCR", key)
        trip.add("EXPIRE", key, window + 1)
        trip.send()
        try:
            return count.value
        except redis.RedisError:
            return self.fallback.count_request(user, window)


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


class RedisLease:
    """A turn's hold on a conversation: a Redis key holding the turn's token, with an expiry."""

    def __init__(self, coordination, key, token):
        """A held lease."""
        self.coordination, self.key, self.token = coordination, key, token
        self.released = False

    def extend(self, ttl):
        """Keep holding the conversation for `ttl` more seconds."""
        self.coordination.extend(self.key, self.token, ttl)

    def release(self, trip=None):
        """Let the next turn in (once), in `trip` if given."""
        if not self.released:
            self.released = True
            self.coordination.release(self.key, self.token, trip)


class MemoryCoordination:
    """Leases, stop signals and request counts in this process."""

    backend = "memory"

    def __init__(self):
        """No conversation held, no request counted."""
        self._holders = {}
        self._counts = {}
        self._mutex = threading.Lock()
        self._on_stop = None

    def take(self, conversation_id, ttl, holder="", trip=None):
        """Hold the conversation for one turn: a Lease, or None if it is held."""
        with self._mutex:
            if self.holder_of(conversation_id) is not None:
                return Pending.done(None)
            token = f"{secrets.token_hex(16)} {holder}"
            self._holders[conversation_id] = (token, time.monotonic() + ttl)
        return Pending.done(MemoryLease(self, conversation_id, token))

    def holder_of(self, conversation_id):
        """Who holds the conversation now (the `holder` given to take), or None."""
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

    def publish_stop(self, conversation_id):
        """Stop the conversation's stream (this process is the only one)."""
        if self._on_stop is not None:
            self._on_stop(conversation_id)

    def listen_for_stops(self, on_stop):
        """Call `on_stop(conversation_id)` for every stop published."""
        self._on_stop = on_stop

    def count_request(self, user, window):
        """Count a request of `user` in the current window; the count so far."""
        slot = int(time.time() // window)
        with self._mutex:
            if len(self._counts) > MEMORY_ENTRIES:
                self._counts = {k: v for k, v in self._counts.items() if k[1] == slot}
            self._counts[(user, slot)] = self._counts.get((user, slot), 0) + 1
            return self._counts[(user, slot)]


class MemoryLease:
    """A turn's hold on a conversation in this process."""

    def __init__(self, coordination, conversation_id, token):
        """A held lease."""
        self.coordination, self.conversation_id, self.token = coordination, conversation_id, token

    def extend(self, ttl):
        """Keep holding the conversation for `ttl` more seconds."""
        self.coordination.extend(self.conversation_id, self.token, ttl)

    def release(self, trip=None):
        """Let the next turn in."""
        self.coordination.release(self.conversation_id, self.token)
