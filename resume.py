"""Resume: the events of a conversation's current or last turn, after the last one a reader has, from any instance.

From the turn's own feed when this process runs it (or, on the embedded defaults, ran it
lately); else from the journal in Redis, replayed and then followed live until the final event.
A reader that finds nobody running an unended turn saves it (its process died) and goes on.
"""

import threading
import time

import sse
from errors import NotFound, ResumeUnavailable, ShuttingDown, TooManyStreams
from journal import JournalUnavailable
from models import Conversation, DatabaseUnavailable, connection
from redis_link import scope
from relay import Body
from turns import final_data, final_metrics


class Replays:
    """Serves GET /chat/stream/{id} for a ChatService."""

    def __init__(self, service):
        """Replay the turns of `service` (its feeds, what processes share, its settings and meter)."""
        self.service = service
        self.journal, self.coordination = service.journal, service.coordination
        self.settings, self.meter = service.settings, service.meter
        self._stopping = threading.Event()

    def resume(self, user, conversation_id, last_event_id=None):
        """The body of the events after `last_event_id` ((turn id, n)), live until the final one; None when there
        is nothing to send. Raises NotFound, ResumeUnavailable, TooManyStreams."""
        name = scope(user, conversation_id)
        after_turn, after = last_event_id or (None, 0)
        feed = self.service.feeds.get(name) or self._kept_feed(user, conversation_id, name)
        if feed is not None:
            after = after if after_turn == feed.turn_id else 0
            if feed.ended and after >= len(feed.framed):
                return None
            return self.service.reader(feed, after, release=self._stream_slot(user).release)
        record = self._record(user, conversation_id, name)
        if record is None:
            if not self._theirs(user, conversation_id, name):
                raise NotFound()
            return None
        after = after if after_turn == record.turn_id else 0
        if record.final is not None and after >= record.final[0]:
            return None
        slot = self._stream_slot(user)
        with self.service.round_trip() as trip:
            watching = self.coordination.watch(record.turn_id, trip)
        self.meter.stream_opened()

        def leave():
            """The reader is gone: free its slot and its watch."""
            self.meter.stream_closed()
            for held in (slot, watching.value):
                if held is not None:
                    held.release()

        return Body(self._follow(user, conversation_id, name, record, after), leave)

    def _record(self, user, conversation_id, name):
        """The journal's Record of the conversation's last turn (None without a shared journal, or none kept).

        While the journal cannot be read: 503, but only for a conversation of the user's (else 404, as ever).
        """
        if not self.journal.shared:
            return None
        try:
            return self.journal.read(name)
        except JournalUnavailable:
            if not self._theirs(user, conversation_id, name):
                raise NotFound() from None
            raise ResumeUnavailable() from None

    def _theirs(self, user, conversation_id, name):
        """Whether the user has the conversation: in the database, or held by its first turn (not saved yet)."""
        return self._known(user, conversation_id) or self.coordination.holder_of(name) is not None

    @staticmethod
    def _known(user, conversation_id):
        """Whether the user has a conversation of that id in the database."""
        with connection():
            return Conversation.state_of(user, conversation_id)[0] is not None

    def _kept_feed(self, user, conversation_id, name):
        """An ended feed this process keeps for resume, if it has not expired and its conversation is still there."""
        kept = self.service.ended.get(name)
        if kept is None or kept[1] <= time.monotonic():
            return None
        if not self._known(user, conversation_id):  # deleted since
            self.service.ended.pop(name, None)
            return None
        return kept[0]

    def _stream_slot(self, user):
        """One of the user's stream slots, or 429."""
        with self.service.round_trip() as trip:
            opened = self.coordination.open_stream(user, self.settings.max_streams, trip)
        if opened.value is None:
            raise TooManyStreams(self.settings.max_streams)
        return opened.value

    def _follow(self, user, conversation_id, name, record, after):
        """Replay a journaled turn after event `after`, then follow it live until its final event."""
        sent, last_ping = after, time.monotonic()
        try:
            while True:
                if record.gap:
                    yield self._cut_short(conversation_id, "part of this reply was not kept for resuming")
                    return
                for number, text in record.events:
                    if number > sent:
                        yield sse.frame(f"{record.turn_id}:{number}", text)
                        sent = number
                if record.final is not None:
                    yield sse.frame(f"{record.turn_id}:{record.final[0]}", record.final[1])
                    return
                if self._stopping.is_set():
                    yield self._cut_short(conversation_id, error=ShuttingDown())
                    return
                entries = self.journal.follow(name, record.last_entry, min(1.0, self.settings.heartbeat))
                if entries:
                    record.take(entries)
                    continue
                if time.monotonic() - last_ping >= self.settings.heartbeat:
                    last_ping = time.monotonic()
                    yield sse.PING
                if self.coordination.holder_of(name) is None and not self._saved_or_gone(user, conversation_id, name):
                    yield self._cut_short(conversation_id, "the turn's journal is gone")
                    return
        except (JournalUnavailable, DatabaseUnavailable):
            yield self._cut_short(conversation_id, "the journal or the database became unavailable")

    def _saved_or_gone(self, user, conversation_id, name):
        """Nobody runs the turn (its process died): save it and end its journal; False if the journal went
        (the conversation was deleted)."""
        self.service.recover(user, conversation_id)
        return self.journal.read(name) is not None

    @staticmethod
    def _cut_short(conversation_id, why=None, error=None):
        """A final event saying the replay cannot go on (and where the reply is).

        It has no id: it is not one of the turn's events, and a reader who resumes from the last
        real one must get the next real one.
        """
        error = error or ResumeUnavailable(message=f"{why}; read it in /conversations/{conversation_id}")
        return sse.unnumbered(final_data(conversation_id, "error", final_metrics(), error))

    def stop_following(self):
        """End every replay of another instance's turn with a final event (the service is shutting down)."""
        self._stopping.set()
