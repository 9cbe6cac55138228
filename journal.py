"""A turn's journal in Redis: its user message when it starts, its events as they stream, its final event.

Any instance can replay a journal to a reader who reconnects, and the next request that finds
a journal whose turn never ended (its process died) saves what it holds. One Redis Stream per
conversation holds its turns' entries: `start` (the user message), `events` (a batch of
events, `first` numbering the first), `end` (the final event) and `abandoned` (a turn refused
before it was accepted, which leaves the turn before it as the last). A turn's end trims the
entries of the turns before it. Events are batched by one writer per process every
FLUSH_SECONDS, off the path from the model to the client; a batch that fails is sent again
with the next. A batch is written only while its turn holds the conversation's lease (checked
in Redis, in the same round trip), so a process that stalled past it writes nothing once
another has saved the turn. A running turn's journal is kept UNFINISHED_KEEP_SECONDS, an
ended one's STREAM_RETAIN_SECONDS.

Without Redis there is no journal (`NoJournal`): resume works within the process, from the
turns it holds (turns.py), and a crash loses the turn in flight.
"""

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import redis

from redis_link import Pending

log = logging.getLogger(__name__)

KEY = "chat:journal:{}"
FLUSH_SECONDS = 0.25
FOLLOW_SECONDS = 1.0
# A journal whose turn never ended waits this long for the next request to save it.
UNFINISHED_KEEP_SECONDS = 7 * 86400
MAX_ENTRIES = 100000

# Whether the last turn in the journal KEYS[2] is unfinished: its last entry is neither an end nor an abandon.
_LAST_TURN_UNFINISHED = """
local function last_turn_unfinished()
    local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
    if #last == 0 then return false end
    local fields = last[1][2]
    for i = 1, #fields, 2 do
        if fields[i] == 'kind' then return fields[i + 1] ~= 'end' and fields[i + 1] ~= 'abandoned' end
    end
    return false
end
"""

# Start a turn's journal, if the caller holds the conversation's lease (KEYS[1]) and the last turn is over
# (ended, or abandoned). Returns the start entry's id, or why not: 'not-holder', 'unfinished'.
_START = _LAST_TURN_UNFINISHED + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'not-holder' end
if last_turn_unfinished() then return 'unfinished' end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'turn', ARGV[2], 'kind', 'start',
                      'message', ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return id
"""

# Whether a dead process left the journal's last turn: it is unfinished and nobody holds the lease (KEYS[1]).
_LEFT_BY_THE_DEAD = _LAST_TURN_UNFINISHED + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if last_turn_unfinished() then return 1 end
return 0
"""


# Journal a batch of a streamed turn's events if the caller still holds the conversation's lease (a process
# that stalled past it must not write once another saved the turn), and keep the journal while the turn runs.
# Returns 1, or 0 when the lease is not the caller's.
_ADD_EVENTS = """
local written = {}
for i = 1, #KEYS / 2 do
    local lease, journal, at = KEYS[2 * i - 1], KEYS[2 * i], 2 + 4 * (i - 1)
    if redis.call('GET', lease) ~= ARGV[at + 1] then
        written[i] = 0
    elseif type(redis.pcall('XADD', journal, 'MAXLEN', '~', ARGV[2], '*', 'turn', ARGV[at + 2], 'kind', 'events',
                            'first', ARGV[at + 3], 'data', ARGV[at + 4])) == 'table' then
        written[i] = -1  -- refused (the key is not a stream): this batch alone goes again
    else
        redis.call('PEXPIRE', journal, ARGV[1])
        written[i] = 1
    end
end
return written
"""


class JournalUnavailable(Exception):
    """The journal could not be read (Redis is away)."""


@dataclass
class Record:
    """What a journal holds of one turn."""

    turn_id: str
    message: str = ""
    events: list = field(default_factory=list)  # (n, data) in order
    final: tuple = None  # (n, data) once the turn ended
    last_entry: str = "0"
    gap: bool = False  # an events entry is missing

    def take(self, entries):
        """Add journal entries (id, fields) read in order; entries of other turns, and of this one after its end,
        are passed over."""
        for entry_id, fields in entries:
            self.last_entry = entry_id
            if fields.get("turn") != self.turn_id or self.final is not None:
                continue
            kind = fields.get("kind")
            if kind == "start":
                self.message = fields.get("message", "")
            elif kind == "events":
                self._add_batch(int(fields["first"]), fields["data"].split("\n"))
            elif kind == "end":
                self.final = (int(fields["n"]), fields["data"])

    def _add_batch(self, first, texts):
        """Add a batch of events numbered from `first`: those already here (a batch sent twice) are skipped."""
        expected = self.next_number()
        if first > expected:
            self.gap = True
        self.events.extend((n, text) for n, text in enumerate(texts, start=first) if n >= expected)

    def next_number(self):
        """The number the next event will have."""
        return self.events[-1][0] + 1 if self.events else 1


def last_record(entries):
    """The Record of the last turn in a journal's entries that was not abandoned, or None."""
    turns, abandoned = [], set()
    for _, fields in entries:
        if fields.get("kind") == "start":
            turns.append(fields.get("turn", ""))
        elif fields.get("kind") == "abandoned":
            abandoned.add(fields.get("turn", ""))
    kept = [turn for turn in turns if turn not in abandoned]
    if not kept:
        return None
    record = Record(turn_id=kept[-1])
    record.take(entries)
    return record


@runtime_checkable
class Journal(Protocol):
    """Where turns are journaled; `name` is a conversation's scoped name."""

    shared: bool

    def start(self, name, turn_id, message, lease_key, lease_token, trip):
        """Open the turn's journal in `trip`, if the lease is the caller's: the start entry's id, 'unfinished'
        (a dead turn's is there) or 'not-holder'."""

    def keep(self, feed, lease_key, lease_token):
        """Journal a streamed turn's events as its runner adds them, while the turn holds the lease (key, token)."""

    def end(self, name, turn_id, feed, final, trip, started=None):
        """Write the rest of the events and the final event (n, data) in `trip`; trim the turns before the one
        whose start entry is `started`, and keep the journal a while."""

    def abandon(self, name, turn_id, trip):
        """Mark a turn refused before it was accepted: the turn before it is the last again."""

    def left_by_the_dead(self, name, lease_key, trip):
        """In `trip`: whether the conversation's last turn is unfinished and nobody holds its lease (`lease_key`),
        so a process that died left it (False if Redis cannot say)."""

    def drop(self, names):
        """Forget the journals of conversations that were deleted."""

    def read(self, name):
        """The Record of the conversation's current or last turn, None if none is kept."""

    def follow(self, name, after_entry, wait):
        """Entries after `after_entry`, waiting up to `wait` seconds for one."""


class RedisJournal:
    """Journals in Redis Streams, shared by every process and instance."""

    shared = True

    def __init__(self, link, retain_seconds):
        """Journal through the Redis `link`; an ended turn is kept `retain_seconds`."""
        self.link = link
        self.retain_seconds = retain_seconds
        self._feeds = {}  # the streamed turns journaled, with the (key, token) of their lease
        self._add_events_script = link.script(_ADD_EVENTS)
        self._script_loaded = False  # sent by its hash once Redis has it
        self._writer = None
        self._warned = False

    def start(self, name, turn_id, message, lease_key, lease_token, trip):
        """Open the turn's journal in `trip`, if the lease is the caller's and the last turn is over."""
        return trip.add("EVAL", _START, 2, lease_key, KEY.format(name), lease_token, turn_id, message,
                        UNFINISHED_KEEP_SECONDS * 1000, MAX_ENTRIES, otherwise=lambda failure: "unavailable")

    def keep(self, feed, lease_key, lease_token):
        """Journal `feed`'s events every FLUSH_SECONDS until it ends, while its turn holds the lease (key, token)."""
        self._feeds[feed] = (lease_key, lease_token)
        if self._writer is None:  # started in the process that streams, after gunicorn forks
            self._writer = threading.Thread(target=self._write_forever, daemon=True)
            self._writer.start()

    def _write_forever(self):
        """Flush every feed's new events, in one round trip, for ever."""
        while True:
            time.sleep(FLUSH_SECONDS)
            try:
                self._flush()
            except Exception:  # noqa: BLE001 - the writer must outlive any one failure
                log.exception("could not journal events")

    def _flush(self):
        """Write the new events of every journaled feed whose turn still holds its lease, in one command."""
        held, batches = [], []
        try:
            for feed, lease in list(self._feeds.items()):
                if feed.ended:
                    self._feeds.pop(feed, None)
                elif feed.unjournaled and feed.journal_lock.acquire(blocking=False):
                    held.append(feed)
                    events = feed.take_unjournaled()
                    if events:
                        batches.append((feed, lease, events))
            if batches:
                trip = self.link.round_trip()
                self._add_leased(trip, batches)
                trip.send()
        finally:
            for feed in held:
                feed.journal_lock.release()

    def _add_leased(self, trip, batches):
        """Queue one command writing each (feed, lease (key, token), events) batch whose turn holds its lease; a
        batch that fails goes again with the next, one whose turn lost its lease is not written again."""
        keys, args = [], [UNFINISHED_KEEP_SECONDS * 1000, MAX_ENTRIES]
        for feed, (lease_key, lease_token), events in batches:
            keys += [lease_key, KEY.format(feed.name)]
            args += [lease_token, feed.turn_id, events[0][0], "\n".join(text for _, text in events)]

        def put_back(failure):
            """The write failed: every batch goes again, first, with the next one."""
            for feed, _, events in batches:
                feed.unjournaled[0:0] = events
            if isinstance(failure, redis.exceptions.NoScriptError):
                self._script_loaded = False  # Redis restarted: the next write sends the script itself
            else:
                self._lost(failure)

        def written(replies):
            """Journaled, but for the turns that lost their lease (nothing more of them until their end) and the
            batches Redis refused (again with the next)."""
            self._script_loaded = True
            for (feed, _, events), reply in zip(batches, replies):
                if reply != 1:
                    feed.unjournaled[0:0] = events
                if reply == 0:
                    self._feeds.pop(feed, None)
            return self._back(replies)

        script = ("EVALSHA", self._add_events_script.sha) if self._script_loaded else ("EVAL", _ADD_EVENTS)
        trip.add(*script, len(keys), *keys, *args, then=written, otherwise=put_back)

    def _add_events(self, trip, feed):
        """Queue an entry for `feed`'s events not yet journaled; if the write fails, they go with the next."""
        events = feed.take_unjournaled()
        if not events:
            return

        def put_back(failure):
            """The write failed: the events go again, first, with the next one."""
            feed.unjournaled[0:0] = events
            self._lost(failure)

        trip.add("XADD", KEY.format(feed.name), "MAXLEN", "~", MAX_ENTRIES, "*", "turn", feed.turn_id, "kind",
                 "events", "first", events[0][0], "data", "\n".join(text for _, text in events),
                 then=self._back, otherwise=put_back)

    def _lost(self, failure):
        """A journal write failed; warn once per outage."""
        if not self._warned:
            self._warned = True
            log.warning("journal unavailable, turns streamed now cannot be resumed: %s", type(failure).__name__)

    def _back(self, reply):
        """A write went through: Redis is back."""
        self._warned = False
        return reply

    def end(self, name, turn_id, feed, final, trip, started=None):
        """Write the rest of the events and the final event in `trip`, trim the turns before, keep it a while.

        Only a turn the database kept as its own is ended, so its events go even if its lease lapsed.
        """
        if feed is not None:
            with feed.journal_lock:
                self._add_events(trip, feed)
            self._feeds.pop(feed, None)
        key = KEY.format(name)
        trip.add("XADD", key, "*", "turn", turn_id, "kind", "end", "n", final[0], "data", final[1],
                 then=self._back, otherwise=self._lost)
        if started:
            trip.add("XTRIM", key, "MINID", started, otherwise=self._lost)
        trip.add("PEXPIRE", key, int(self.retain_seconds * 1000), otherwise=self._lost)

    def abandon(self, name, turn_id, trip):
        """Mark a turn refused before it was accepted: the turn before it is the last again, kept as an ended one."""
        key = KEY.format(name)
        trip.add("XADD", key, "*", "turn", turn_id, "kind", "abandoned", otherwise=self._lost)
        trip.add("PEXPIRE", key, int(self.retain_seconds * 1000), otherwise=self._lost)

    def left_by_the_dead(self, name, lease_key, trip):
        """In `trip`: whether a process that died left the conversation's last turn (False if Redis cannot say)."""
        return trip.add("EVAL", _LEFT_BY_THE_DEAD, 2, lease_key, KEY.format(name), then=bool,
                        otherwise=lambda failure: False)

    def drop(self, names):
        """Forget the journals of conversations that were deleted (left to expire if Redis is away)."""
        if names:
            try:
                self.link.call(self.link.client.delete, *[KEY.format(name) for name in names])
            except redis.RedisError as exc:
                self._lost(exc)

    def read(self, name):
        """The Record of the conversation's current or last turn, None if none is kept."""
        try:
            entries = self.link.call(self.link.client.xrange, KEY.format(name))
        except redis.RedisError as exc:
            raise JournalUnavailable(type(exc).__name__) from None
        return last_record(entries)

    def follow(self, name, after_entry, wait):
        """Entries after `after_entry`, waiting up to `wait` seconds (1 ms to FOLLOW_SECONDS) for one."""
        block = max(1, int(min(wait, FOLLOW_SECONDS) * 1000))  # BLOCK 0 would wait for ever
        try:
            found = self.link.blocking().xread({KEY.format(name): after_entry}, block=block)
        except redis.RedisError as exc:
            raise JournalUnavailable(type(exc).__name__) from None
        return found[0][1] if found else []


class NoJournal:
    """No journal: the embedded defaults keep turns in the process only."""

    shared = False

    def start(self, name, turn_id, message, lease_key, lease_token, trip):
        """Nothing to open."""
        return None

    def keep(self, feed, lease_key, lease_token):
        """Nothing to journal."""

    def end(self, name, turn_id, feed, final, trip, started=None):
        """Nothing to write."""

    def abandon(self, name, turn_id, trip):
        """Nothing to mark."""

    def left_by_the_dead(self, name, lease_key, trip):
        """No turn outlives its process here."""
        return Pending.done(False)

    def drop(self, names):
        """Nothing to forget."""

    def read(self, name):
        """Nothing is kept."""
        return None

    def follow(self, name, after_entry, wait):
        """Nothing comes."""
        return []
