"""A turn's journal in Redis: its user message when it starts, its events as they stream, its final event.

Any instance can replay a journal to a reader who reconnects, and the next request that finds
a journal whose turn never ended (its process died) saves what it holds. One Redis Stream per
conversation holds its current or most recent turn: entries `start` (the user message),
`events` (a batch of events, `first` numbering the first) and `end` (the final event).
Events are batched by one writer per process every FLUSH_SECONDS, off the path from the
model to the client; an ended turn's journal is kept STREAM_RETAIN_SECONDS.

Without Redis there is no journal (`NoJournal`): resume works within the process, from the
turns it holds (turns.py), and a crash loses the turn in flight.
"""

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import redis

log = logging.getLogger(__name__)

KEY = "chat:journal:{}"
FLUSH_SECONDS = 0.25
# A journal whose turn never ended waits this long for the next request to save it.
UNFINISHED_KEEP_SECONDS = 7 * 86400
MAX_ENTRIES = 100000

# Start a turn's journal, if the caller holds the conversation's lease and the last turn ended.
_START = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'not-holder' end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if #last > 0 then
    local fields = last[1][2]
    for i = 1, #fields, 2 do
        if fields[i] == 'kind' and fields[i + 1] ~= 'end' then return 'unfinished' end
    end
end
redis.call('DEL', KEYS[2])
redis.call('XADD', KEYS[2], '*', 'turn', ARGV[2], 'kind', 'start', 'message', ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 'started'
"""


class JournalUnavailable(Exception):
    """The journal could not be read (Redis is away)."""


@dataclass
class Record:
    """What a journal holds of a turn."""

    turn_id: str
    message: str = ""
    events: list = field(default_factory=list)  # (n, data) in order
    final: tuple = None  # (n, data) once the turn ended
    last_entry: str = "0"
    gap: bool = False  # an events entry is missing (a write failed while Redis was away)

    def take(self, entries):
        """Add journal entries (id, fields) read in order."""
        for entry_id, fields in entries:
            self.last_entry = entry_id
            kind = fields.get("kind")
            if kind == "start":
                self.message = fields.get("message", "")
            elif kind == "events":
                first = int(fields["first"])
                if first != self.next_number():
                    self.gap = True
                self.events.extend(enumerate(fields["data"].split("\n"), start=first))
            elif kind == "end":
                self.final = (int(fields["n"]), fields["data"])

    def next_number(self):
        """The number the next event will have."""
        return self.events[-1][0] + 1 if self.events else 1


@runtime_checkable
class Journal(Protocol):
    """Where turns are journaled; `name` is a conversation's scoped name."""

    shared: bool

    def start(self, name, turn_id, message, lease, trip):
        """Open the turn's journal in `trip`: 'started', 'unfinished' (a dead turn's is there) or 'not-holder'."""

    def keep(self, run):
        """Journal a streamed turn's events as its runner adds them."""

    def end(self, name, turn_id, run, final, trip):
        """Write the rest of the events and the final event (n, data) in `trip`, and keep the journal a while."""

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
        self._runs = set()
        self._writer = None
        self._warned = False

    def start(self, name, turn_id, message, lease, trip):
        """Open the turn's journal in `trip`, if `lease` holds the conversation and the last turn ended."""
        return trip.add("EVAL", _START, 2, lease.key, KEY.format(name), lease.token, turn_id, message,
                        UNFINISHED_KEEP_SECONDS * 1000, otherwise=lambda failure: "unavailable")

    def keep(self, run):
        """Journal `run`'s events every FLUSH_SECONDS until it ends."""
        self._runs.add(run)
        if self._writer is None:  # started in the process that streams, after gunicorn forks
            self._writer = threading.Thread(target=self._write_forever, daemon=True)
            self._writer.start()

    def _write_forever(self):
        """Flush every run's new events, in one round trip, for ever."""
        while True:
            time.sleep(FLUSH_SECONDS)
            try:
                self._flush()
            except Exception:  # noqa: BLE001 - the writer must outlive any one failure
                log.exception("could not journal events")

    def _flush(self):
        """Write the new events of every journaled run in one round trip."""
        held = []
        trip = self.link.round_trip()
        for run in list(self._runs):
            if run.ended:
                self._runs.discard(run)
            elif run.unjournaled and run.journal_lock.acquire(blocking=False):
                held.append(run)
                self._add_events(trip, run)
        try:
            trip.send()
        finally:
            for run in held:
                run.journal_lock.release()

    def _add_events(self, trip, run):
        """Queue an entry for `run`'s events not yet journaled."""
        events = run.take_unjournaled()
        if events:
            trip.add("XADD", KEY.format(run.name), "MAXLEN", "~", MAX_ENTRIES, "*", "turn", run.turn_id,
                     "kind", "events", "first", events[0][0], "data", "\n".join(text for _, text in events),
                     otherwise=self._lost)

    def _lost(self, failure):
        """A journal write failed: resume of that turn answers its gap; warn once per outage."""
        if not self._warned:
            self._warned = True
            log.warning("journal unavailable, turns streamed now cannot be resumed: %s", type(failure).__name__)

    def end(self, name, turn_id, run, final, trip):
        """Write the rest of the events and the final event in `trip`, and keep the journal a while."""
        if run is not None:
            with run.journal_lock:
                self._add_events(trip, run)
        self._runs.discard(run)
        key = KEY.format(name)
        trip.add("XADD", key, "*", "turn", turn_id, "kind", "end", "n", final[0], "data", final[1],
                 otherwise=self._lost)
        trip.add("PEXPIRE", key, int(self.retain_seconds * 1000), then=self._back, otherwise=self._lost)

    def discard(self, name, trip):
        """Forget the conversation's journal in `trip` (a turn refused before it was accepted)."""
        trip.add("DEL", KEY.format(name), otherwise=self._lost)

    def drop(self, names):
        """Forget the journals of conversations that were deleted (left to expire if Redis is away)."""
        if names:
            try:
                self.link.call(self.link.client.delete, *[KEY.format(name) for name in names])
            except redis.RedisError as exc:
                self._lost(exc)

    def _back(self, reply):
        """A write went through: Redis is back."""
        self._warned = False
        return reply

    def read(self, name):
        """The Record of the conversation's current or last turn, None if none is kept."""
        try:
            entries = self.link.call(self.link.client.xrange, KEY.format(name))
        except redis.RedisError as exc:
            raise JournalUnavailable(type(exc).__name__) from None
        if not entries:
            return None
        record = Record(turn_id=entries[0][1].get("turn", ""))
        record.take(entries)
        return record

    def follow(self, name, after_entry, wait):
        """Entries after `after_entry`, waiting up to `wait` seconds for one."""
        try:
            found = self.link.call(self.link.client.xread, {KEY.format(name): after_entry},
                                   block=int(wait * 1000))
        except redis.RedisError as exc:
            raise JournalUnavailable(type(exc).__name__) from None
        return found[0][1] if found else []


class NoJournal:
    """No journal: the embedded defaults keep turns in the process only."""

    shared = False

    def start(self, name, turn_id, message, lease, trip):
        """Nothing to open."""
        return None

    def keep(self, run):
        """Nothing to journal."""

    def end(self, name, turn_id, run, final, trip):
        """Nothing to write."""

    def discard(self, name, trip):
        """Nothing to forget."""

    def drop(self, names):
        """Nothing to forget."""

    def read(self, name):
        """Nothing is kept."""
        return None

    def follow(self, name, after_entry, wait):
        """Nothing comes."""
        return []
