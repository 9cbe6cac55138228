"""What the processes of the service agree on: who holds a conversation, open streams, stop signals, request counts.

In Redis when `REDIS_URL` is set, so every process and instance shares them; else in this
process (the embedded defaults run one process). While Redis is away, conversations are
held, streams and requests counted, in the process only.

A turn holds its conversation with a lease, and an open stream holds one of its user's
stream slots: each has a short expiry (LEASE_SECONDS), renewed by a keeper in the holder's
process for as long as the holder lives, whatever its client does. A holder that dies
stops renewing, and what it held is free again within the expiry.
"""

import logging
import secrets
import threading
import time
from typing import Protocol, runtime_checkable
from urllib.parse import quote

import redis

from outages import Outage, redis_reason
from redis_link import RETRY_AFTER_FAILURE, LocalTrip, Pending, RedisDown

log = logging.getLogger(__name__)

LOCK_KEY = "chat:turn-lock:{}"
STREAMS_KEY = "chat:streams:{}"
WATCHERS_KEY = "chat:watchers:{}"
RATE_KEY = "chat:rate:{}:{}"
SPENT_KEY = "chat:spent:{}:{}"
# A day's count lives this long from when it was built from the database, whatever is added to it:
# what it missed (turns that ended while Redis was unreachable) counts again within this time.
SPENT_RECOUNT_SECONDS = 600
# Pub/sub channels are one namespace for every database of a Redis server: the channel names the
# database, so two deployments on one server (databases 0 and 1, say) never stop each other's turns.
STOP_CHANNEL = "chat:stop:{}"
MEMORY_ENTRIES = 10000
# What the service does while Redis is away, said in the log when an outage begins.
WHILE_REDIS_IS_DOWN = ("Until it is back, turns are guarded per process only: another worker or instance may "
                       "run a turn of a conversation that is already running one, and rate limits and stream "
                       "caps count per process")

# Delete a lock only if it still holds the token of the turn that took it.
_RELEASE_IF_OURS = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

# Add to a day's count only if it is there: a count Redis lost is built again from the database by
# the next turn's begin, never started from one turn's tokens. INCRBY keeps the key's expiry.
_ADD_IF_COUNTED = """
if redis.call('EXISTS', KEYS[1]) == 1 then
    return redis.call('INCRBY', KEYS[1], ARGV[1])
end
return nil
"""

# Extend each lock that still holds the token of the turn that took it (ARGV: the expiry, then a
# token per key); 1 for each extended, 0 for each lost. One command for every lease a process holds.
_EXTEND_IF_OURS = """
local renewed = {}
for i, key in ipairs(KEYS) do
    if redis.call('GET', key) == ARGV[i + 1] then
        renewed[i] = redis.call('PEXPIRE', key, ARGV[1])
    else
        renewed[i] = 0
    end
end
return renewed
"""

# Move each slot's expiry on if it is still there, and its set's own with it (ARGV: the slots' new
# expiry, the sets' expiry, then a member per key); 1 for each moved on, 0 for each lost.
_RENEW_SLOTS = """
local renewed = {}
for i, key in ipairs(KEYS) do
    renewed[i] = redis.call('ZADD', key, 'XX', 'CH', ARGV[1], ARGV[i + 2])
    redis.call('PEXPIRE', key, ARGV[2])
end
return renewed
"""


@runtime_checkable
class Held(Protocol):
    """Something a process holds for a while: a conversation's lease, or a stream slot."""

    released: bool

    def renew(self, trip) -> Pending:
        """Hold on for another expiry; the pending value is whether it was still held."""

    @staticmethod
    def renew_all(held, trip) -> Pending:
        """Renew each of `held` (all of this kind), in one command where it takes one: a bool for each."""

    def release(self, trip=None):
        """Let go (once), in `trip` if given."""


@runtime_checkable
class Coordination(Protocol):
    """What the processes share.

    A conversation is named by `redis_link.scope(user, conversation_id)`; `trip` is the round
    trip a command rides in.
    """

    backend: str

    def take(self, name, holder, trip, token=None) -> Pending:
        """Hold the conversation for one turn: a lease (renewed until released), or None if another holds it."""

    def holder_of(self, name):
        """Who holds the conversation now (the `holder` given to take), or None."""

    def open_stream(self, user, limit, trip) -> Pending:
        """Take one of the user's `limit` stream slots: a slot (renewed until released), or None if all are taken."""

    def publish_stop(self, name):
        """Ask whichever process streams the conversation to stop."""

    def listen_for_stops(self, on_stop):
        """Call `on_stop(name)` for every stop published."""

    def watch(self, turn_id, trip) -> Pending:
        """Note a reader of the turn in this process: a slot, renewed until released."""

    def watched(self, turn_id):
        """Whether any process has a reader of the turn."""

    def count_request(self, user, window, now):
        """Count a request of `user` at `now`: the counts of the previous and the current window."""

    def spent(self, user, day, trip) -> Pending:
        """The tokens the user spent on `day` (a date), as counted here; None if not counted (a new day, or lost)."""

    def count_spent(self, user, day, tokens):
        """Start the day's count from `tokens` (the database's sum) unless another process already did; the count.

        In Redis the count lives SPENT_RECOUNT_SECONDS, then the next turn builds it again.
        """

    def spend(self, user, day, tokens, trip):
        """Add `tokens` to the user's count for `day`, if it is counted (else the database's sum counts them)."""


def lease_key(name):
    """The Redis key of the lease on a conversation."""
    return LOCK_KEY.format(name)


def lease_token(token, holder):
    """What a lease's key holds: the taker's token, and what holds it (for holder_of)."""
    return f"{token} {holder}"


class Keeper:
    """Renews everything this process holds, in one round trip, three times per expiry."""

    def __init__(self, round_trip, seconds):
        """Renew in round trips made by `round_trip()`, every `seconds` / 3."""
        self.round_trip = round_trip
        self.seconds = seconds
        self._held = set()
        self._started = False

    def keep(self, held):
        """Renew `held` until it is let go."""
        self._held.add(held)
        if not self._started:  # started in the process that holds things, after gunicorn forks
            self._started = True
            threading.Thread(target=self._run, daemon=True).start()

    def forget(self, held):
        """Stop renewing `held`."""
        self._held.discard(held)

    def _run(self):
        """Renew for ever."""
        while True:
            time.sleep(self.seconds / 3)
            try:
                self.renew()
            except Exception:  # noqa: BLE001 - the keeper must outlive any one failure
                log.exception("could not renew leases")

    def renew(self):
        """Extend everything held by a full expiry, one command for each kind held; stop renewing what was lost."""
        kinds = {}
        for item in list(self._held):
            kinds.setdefault(type(item), []).append(item)
        if not kinds:
            return
        with self.round_trip() as trip:
            renewals = [(items, kind.renew_all(items, trip)) for kind, items in kinds.items()]
        for items, renewed in renewals:
            for item, held in zip(items, renewed.value or [None] * len(items)):  # None: Redis failed, try again
                if held is False and not item.released:
                    log.warning("a turn lost its lease (Redis lost it, or the process stalled for %g s)",
                                self.seconds)
                    self.forget(item)


class RedisCoordination:
    """Leases, stream slots, stop signals and request counts in Redis, shared by every process and instance."""

    backend = "redis"

    def __init__(self, link, lease_seconds=10):
        """Coordinate through the Redis `link`; in this process while Redis is away."""
        self.link = link
        self.lease_seconds = lease_seconds
        self._release_if_ours = link.script(_RELEASE_IF_OURS)
        self._unreleased = set()  # (key, token) of releases Redis missed: sent again with the next take
        self.stop_channel = STOP_CHANNEL.format(link.client.connection_pool.connection_kwargs.get("db", 0))
        self.keeper = Keeper(link.round_trip, lease_seconds)
        self.fallback = MemoryCoordination(lease_seconds)
        link.outage.while_down = WHILE_REDIS_IS_DOWN

    def take(self, name, holder, trip, token=None):
        """Hold the conversation for one turn, across every process: a lease, or None if it is held.

        `holder` (say "stream") is kept with the lease, for holder_of. The lease's key and token
        are lease_key(name) and lease_token(token, holder): a token the caller gives (its turn's
        id) lets it name the lease before the round trip is sent.
        """
        own = token or secrets.token_hex(16)
        key, token = lease_key(name), lease_token(own, holder)
        self._release_missed(trip)

        def taken(reply):
            """The lease, renewed from now on, if the SET took it."""
            return self._kept(RedisLease(self, key, token)) if reply else None

        def held_here(failure):
            """Redis failed: hold the conversation in this process only."""
            if not isinstance(failure, RedisDown):
                self._unreleased.add((key, token))  # a Redis that hung may still carry the SET out later
            log.debug("Redis unavailable, holding the conversation in this process only: %s", type(failure).__name__)
            return self.fallback.take(name, holder, LocalTrip(), own).value

        return trip.add("SET", key, token, "NX", "PX", self.expiry_ms(), then=taken, otherwise=held_here)

    def open_stream(self, user, limit, trip):
        """Take one of the user's `limit` stream slots across every process: a slot, or None if all are taken."""
        return self._slot(STREAMS_KEY.format(quote(user, safe="")), limit, trip,
                          lambda: self.fallback.open_stream(user, limit, LocalTrip()).value)

    def watch(self, turn_id, trip):
        """Note a reader of the turn in this process, for watched(); a slot to release when it leaves."""
        return self._slot(WATCHERS_KEY.format(turn_id), None, trip,
                          lambda: self.fallback.watch(turn_id, LocalTrip()).value)

    def watched(self, turn_id):
        """Whether any process has a reader of the turn."""
        try:
            return self.link.call(self.link.client.zcount, WATCHERS_KEY.format(turn_id),
                                  int(time.time() * 1000), "+inf") > 0
        except redis.RedisError:
            return self.fallback.watched(turn_id)

    def _slot(self, key, limit, trip, fallback):
        """Take a slot of the sorted set `key`, of at most `limit` (None: any number), renewed until released."""
        member = secrets.token_hex(8)
        now_ms = int(time.time() * 1000)
        trip.add("ZREMRANGEBYSCORE", key, "-inf", now_ms)  # slots of holders that died
        trip.add("ZADD", key, now_ms + self.expiry_ms(), member)
        trip.add("PEXPIRE", key, 2 * self.expiry_ms())

        def counted(taken):
            """The slot, if the set is within the limit with it."""
            slot = RedisSlot(self, key, member)
            if limit is not None and taken > limit:
                slot.release()
                return None
            return self._kept(slot)

        def counted_here(failure):
            """Redis failed: count in this process only."""
            return fallback()

        return trip.add("ZCARD", key, then=counted, otherwise=counted_here)

    def _release_missed(self, trip):
        """Send again, in `trip`, the releases that failed while Redis was away (so nobody waits out an expiry)."""
        for key, token in list(self._unreleased):
            trip.add("EVAL", _RELEASE_IF_OURS, 1, key, token,
                     then=lambda reply, missed=(key, token): self._unreleased.discard(missed),
                     otherwise=lambda failure: None)

    def _kept(self, held):
        """`held`, renewed from now on."""
        self.keeper.keep(held)
        return held

    def expiry_ms(self):
        """A lease's (and a slot's) expiry, in milliseconds."""
        return int(self.lease_seconds * 1000)

    def release(self, held, command, trip=None):
        """Stop renewing `held` and send `command` to release it (if Redis is away, again with the next take)."""
        self.keeper.forget(held)

        def expires(failure):
            """Redis failed: the release goes again with the next take, and the lease lapses meanwhile."""
            log.debug("could not release a lease now; it expires within %g s: %s", self.lease_seconds,
                      type(failure).__name__)
            if isinstance(held, RedisLease):
                self._unreleased.add((held.key, held.token))

        if trip is not None:
            trip.add(*command, otherwise=expires)
            return
        try:
            self.link.call(self.link.client.execute_command, *command)
        except redis.RedisError as exc:
            expires(exc)

    def holder_of(self, name):
        """Who holds the conversation now (the `holder` given to take), or None."""
        try:
            token = self.link.call(self.link.client.get, LOCK_KEY.format(name))
        except redis.RedisError:
            return self.fallback.holder_of(name)
        return None if token is None else token.partition(" ")[2]

    def publish_stop(self, name):
        """Ask whichever process streams the conversation to stop (this one, if Redis is away)."""
        try:
            self.link.call(self.link.client.publish, self.stop_channel, name)
        except redis.RedisError:
            self.fallback.publish_stop(name)

    def listen_for_stops(self, on_stop):
        """Call `on_stop(name)` for every stop published, from a background thread."""
        self.fallback.listen_for_stops(on_stop)
        listener = self.link.listener()
        threading.Thread(target=_receive_stops, args=(listener, self.stop_channel, on_stop), daemon=True).start()

    def count_request(self, user, window, now):
        """Count a request of `user` at `now` in fixed windows of `window` seconds, in one round trip.

        Returns the counts of the previous window and of the current one, this request included.
        """
        slot, who = int(now // window), quote(user, safe="")
        trip = self.link.round_trip()
        current = trip.add("INCR", RATE_KEY.format(who, slot))
        trip.add("EXPIRE", RATE_KEY.format(who, slot), 2 * window + 1)
        previous = trip.add("GET", RATE_KEY.format(who, slot - 1))
        trip.send()
        try:
            return int(previous.value or 0), current.value
        except redis.RedisError:
            return self.fallback.count_request(user, window, now)


    def spent(self, user, day, trip):
        """The tokens the user spent on `day`, as Redis counts them; None if it has no count (or failed)."""
        return trip.add("GET", SPENT_KEY.format(quote(user, safe=""), day.isoformat()),
                        then=lambda reply: None if reply is None else int(reply), otherwise=lambda failure: None)

    def count_spent(self, user, day, tokens):
        """Start the day's count from `tokens` unless another process already did; the count."""
        key = SPENT_KEY.format(quote(user, safe=""), day.isoformat())
        trip = self.link.round_trip()
        trip.add("SET", key, tokens, "NX", "EX", SPENT_RECOUNT_SECONDS)
        counted = trip.add("GET", key, then=lambda reply: tokens if reply is None else int(reply),
                           otherwise=lambda failure: tokens)
        trip.send()
        return counted.value

    def spend(self, user, day, tokens, trip):
        """Add `tokens` to the user's count for `day` if Redis has it (one it lost is rebuilt from the database)."""
        key = SPENT_KEY.format(quote(user, safe=""), day.isoformat())
        trip.add("EVAL", _ADD_IF_COUNTED, 1, key, tokens, otherwise=lambda failure: None)


def _receive_stops(listener, channel, on_stop):
    """Deliver stop signals for ever, reconnecting after Redis failures (said once an outage)."""
    outage = Outage("Redis's stop channel", "A stop sent to another process cannot reach this one's streams "
                                            "until it is back")
    while True:
        try:
            pubsub = listener.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(channel)
            outage.recovered()
            for message in pubsub.listen():
                on_stop(message["data"])
        except redis.RedisError as exc:
            outage.failed(redis_reason(exc))
            time.sleep(RETRY_AFTER_FAILURE)


class RedisLease:
    """A turn's hold on a conversation: a Redis key holding the turn's token, with an expiry."""

    def __init__(self, coordination, key, token):
        """A held lease."""
        self.coordination, self.key, self.token = coordination, key, token
        self.released = False

    def renew(self, trip):
        """Extend the lease if it is still ours."""
        return self.renew_all([self], trip, then=lambda replies: bool(replies[0]))

    @staticmethod
    def renew_all(leases, trip, then=lambda replies: [bool(reply) for reply in replies]):
        """Extend each of `leases` (of one coordination) still ours, in one command: a bool for each."""
        return trip.add("EVAL", _EXTEND_IF_OURS, len(leases), *[lease.key for lease in leases],
                        leases[0].coordination.expiry_ms(), *[lease.token for lease in leases],
                        then=then, otherwise=lambda failure: None)

    def release(self, trip=None):
        """Let the next turn in (once), in `trip` if given."""
        if not self.released:
            self.released = True
            self.coordination.release(self, ("EVAL", _RELEASE_IF_OURS, 1, self.key, self.token), trip)


class RedisSlot:
    """One of a user's stream slots: a member of a Redis sorted set, scored by its expiry."""

    def __init__(self, coordination, key, member):
        """A held slot."""
        self.coordination, self.key, self.member = coordination, key, member
        self.released = False

    def renew(self, trip):
        """Move the slot's expiry on, and the set's own with it (an empty set must not outlive its slots)."""
        return self.renew_all([self], trip, then=lambda replies: bool(replies[0]))

    @staticmethod
    def renew_all(slots, trip, then=lambda replies: [bool(reply) for reply in replies]):
        """Move each of `slots` (of one coordination) on, in one command: a bool for each (False: it was lost)."""
        expiry_ms = slots[0].coordination.expiry_ms()
        return trip.add("EVAL", _RENEW_SLOTS, len(slots), *[slot.key for slot in slots],
                        int(time.time() * 1000) + expiry_ms, 2 * expiry_ms, *[slot.member for slot in slots],
                        then=then, otherwise=lambda failure: None)

    def release(self, trip=None):
        """Free the slot (once), in `trip` if given."""
        if not self.released:
            self.released = True
            self.coordination.release(self, ("ZREM", self.key, self.member), trip)


class MemoryCoordination:
    """Leases, stream slots, stop signals and request counts in this process."""

    backend = "memory"

    def __init__(self, lease_seconds=10):
        """No conversation held, no stream open, no request counted."""
        self.lease_seconds = lease_seconds
        self._holders = {}
        self._streams = {}
        self._watchers = {}
        self._counts = {}
        self._spent = {}
        self._mutex = threading.Lock()
        self._on_stop = None
        self.keeper = Keeper(LocalTrip, lease_seconds)

    def take(self, name, holder="", trip=None, token=None):
        """Hold the conversation for one turn: a lease, or None if it is held."""
        with self._mutex:
            if self.holder_of(name) is not None:
                return Pending.done(None)
            token = lease_token(token or secrets.token_hex(16), holder)
            self._holders[name] = (token, time.monotonic() + self.lease_seconds)
        lease = MemoryHeld(self, self._holders, name, token)
        self.keeper.keep(lease)
        return Pending.done(lease)

    def holder_of(self, name):
        """Who holds the conversation now (the `holder` given to take), or None."""
        held = self._holders.get(name)
        if held is None or held[1] <= time.monotonic():
            return None
        return held[0].partition(" ")[2]

    def open_stream(self, user, limit, trip=None):
        """Take one of the user's `limit` stream slots: a slot, or None if all are taken."""
        return Pending.done(self._slot(self._streams.setdefault(user, {}), limit))

    def watch(self, turn_id, trip=None):
        """Note a reader of the turn: a slot, renewed until released."""
        return Pending.done(self._slot(self._watchers.setdefault(turn_id, {}), None))

    def watched(self, turn_id):
        """Whether the turn has a reader."""
        now = time.monotonic()
        return any(until > now for _, until in self._watchers.get(turn_id, {}).values())

    def _slot(self, slots, limit):
        """Take a slot of the table `slots`, of at most `limit` (None: any number); None if all are taken."""
        now = time.monotonic()
        with self._mutex:
            for member in [m for m, (_, until) in slots.items() if until <= now]:
                del slots[member]  # slots of holders that died
            if limit is not None and len(slots) >= limit:
                return None
            member = secrets.token_hex(8)
            slots[member] = (member, now + self.lease_seconds)
        slot = MemoryHeld(self, slots, member, member)
        self.keeper.keep(slot)
        return slot

    def renew(self, table, name, token):
        """Extend a lease or slot by a full expiry, if still held; whether it was."""
        with self._mutex:
            if table.get(name, (None,))[0] != token:
                return False
            table[name] = (token, time.monotonic() + self.lease_seconds)
            return True

    def release(self, held, table, name, token):
        """Let go of a lease or slot, if still held."""
        self.keeper.forget(held)
        with self._mutex:
            if table.get(name, (None,))[0] == token:
                del table[name]

    def publish_stop(self, name):
        """Stop the conversation's stream (this process is the only one)."""
        if self._on_stop is not None:
            self._on_stop(name)

    def listen_for_stops(self, on_stop):
        """Call `on_stop(name)` for every stop published."""
        self._on_stop = on_stop

    def count_request(self, user, window, now):
        """Count a request of `user` at `now` in fixed windows; the counts of the previous and current one."""
        slot = int(now // window)
        with self._mutex:
            if len(self._counts) > MEMORY_ENTRIES:
                self._counts = {k: v for k, v in self._counts.items() if k[1] >= slot - 1}
            self._counts[(user, slot)] = self._counts.get((user, slot), 0) + 1
            return self._counts.get((user, slot - 1), 0), self._counts[(user, slot)]

    def spent(self, user, day, trip=None):
        """The tokens the user spent on `day`, as counted here; None if not counted yet."""
        return Pending.done(self._spent.get((user, day)))

    def count_spent(self, user, day, tokens):
        """Start the day's count from `tokens` unless it is counted already; the count."""
        with self._mutex:
            if len(self._spent) > MEMORY_ENTRIES:
                self._spent = {k: v for k, v in self._spent.items() if k[1] >= day}
            return self._spent.setdefault((user, day), tokens)

    def spend(self, user, day, tokens, trip=None):
        """Add `tokens` to the user's count for `day`, if it is counted (else the database's sum counts them)."""
        with self._mutex:
            if (user, day) in self._spent:
                self._spent[(user, day)] += tokens


class MemoryHeld:
    """A lease or stream slot held in this process: an entry of one of its tables, with an expiry."""

    def __init__(self, coordination, table, name, token):
        """Held: `table[name]` carries `token`."""
        self.coordination, self.table, self.name, self.token = coordination, table, name, token
        self.released = False

    def renew(self, trip=None):
        """Hold on for another expiry."""
        return Pending.done(self.coordination.renew(self.table, self.name, self.token))

    @staticmethod
    def renew_all(held, trip=None):
        """Hold on to each of `held` for another expiry: a bool for each."""
        return Pending.done([item.renew().value for item in held])

    def release(self, trip=None):
        """Let go (once)."""
        if not self.released:
            self.released = True
            self.coordination.release(self, self.table, self.name, self.token)
