"""A streamed turn in this process: its runner adds the events to a feed, and any number of readers follow it.

The turn lives apart from any one connection. Its first reader is the client that asked for
it; a client that reconnects (GET /chat/stream/{id}) is another, and so is a second tab. When
the last reader leaves, the turn waits STREAM_RESUME_GRACE_SECONDS for a new one before the
model is stopped.
"""

import threading
import time

import sse
from patrol import Patrol, threads_are_greenlets


class Feed:
    """The events of one streamed turn, framed once, as its runner adds them."""

    def __init__(self, turn_id, name, conversation_id):
        """A turn with no event yet and no reader."""
        self.turn_id = turn_id
        self.name = name
        self.conversation_id = conversation_id
        self.framed = []  # event n (from 1) is framed[n - 1]
        self.unjournaled = []  # (n, data) not yet in the journal
        self.journal_lock = threading.Lock()
        self.ended = False
        self.done = threading.Event()
        self.readers = 0
        self.alone_since = None
        self.cut_reason = None
        self.upstream = None  # the model's stream, which a cut closes
        self._news = threading.Event()
        self._waking = None if threads_are_greenlets() else threading.Lock()
        self.last_news = time.monotonic()

    def add(self, text):
        """Add the event whose `data:` is `text`; its number."""
        number = len(self.framed) + 1
        self.framed.append(sse.frame(f"{self.turn_id}:{number}", text))
        self.unjournaled.append((number, text))
        self.last_news = time.monotonic()
        self._wake()
        return number

    def end(self, text):
        """Add the final event; no other follows."""
        number = self.add(text)
        self.ended = True
        self._wake()
        return number

    def _wake(self):
        """Wake every reader waiting for news.

        The runner and the pulse both may: with threads the swap is locked, or a reader could be left
        waiting on an event no one sets; greenlets do not switch in the middle of it.
        """
        if self._waking is None:
            news, self._news = self._news, threading.Event()
        else:
            with self._waking:
                news, self._news = self._news, threading.Event()
        news.set()

    def take_unjournaled(self):
        """The events not yet journaled, handed over to the journal."""
        taken, self.unjournaled = self.unjournaled, []
        return taken

    def read(self, after, heartbeat):
        """Yield the framed events after event number `after` as they come (those ready together in
        one piece), and a ping whenever none came for `heartbeat` seconds; stop after the final one.

        The wait for news has no timeout of its own (a timer started and stopped for every
        chunk): PULSE wakes a feed that had no news for `heartbeat`.
        """
        sent = min(after, len(self.framed))  # an id past the last event claims nothing not yet sent
        PULSE.watch(self, heartbeat, tick=heartbeat / 2)
        while True:
            news = self._news
            if sent < len(self.framed):
                ready = self.framed[sent:]
                sent += len(ready)
                yield ready[0] if len(ready) == 1 else b"".join(ready)
            elif self.ended:
                return
            else:
                news.wait()
                if sent == len(self.framed) and not self.ended:  # woken by the pulse, not by an event
                    yield sse.PING

    def quiet_for(self, heartbeat, now):
        """Wake the readers (to ping) if no news came for `heartbeat` seconds; whether the feed is still open."""
        if self.ended:
            return False
        if now - self.last_news >= heartbeat:
            self.last_news = now
            self._wake()
        return True

    def attach(self):
        """A reader begins."""
        self.readers += 1
        self.alone_since = None

    def detach(self):
        """A reader leaves; whether none is left."""
        self.readers -= 1
        if self.readers == 0 and not self.ended:
            self.alone_since = time.monotonic()
            return True
        return False

    def cut(self, reason):
        """Note why the turn is being cut short (the first reason given wins), and stop the model."""
        if self.cut_reason is None:
            self.cut_reason = reason
        if self.upstream is not None:
            self.upstream.cut()


# Wakes, in each process, the feeds that had no news for a heartbeat, so their readers send a ping.
PULSE = Patrol(Feed.quiet_for, tick=1.0)


class Body:
    """A streamed response's body: its events, and what to let go of when the server closes it.

    A WSGI server closes a body it never iterated (a HEAD request, a client gone before the
    first byte), and a generator's own `finally` runs only if it started: what the reader
    holds is let go here, once, either way.
    """

    def __init__(self, events, on_close):
        """Serve `events`; call `on_close()` when closed."""
        self.events = events
        self._on_close = on_close

    def __iter__(self):
        """The events."""
        return self.events

    def close(self):
        """Close the events, then let go of what the reader holds (once)."""
        try:
            self.events.close()
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close()
