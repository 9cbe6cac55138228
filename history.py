"""A user's conversations as the history API shows them: list, read, rename, delete, prune."""

from errors import ConversationBusy, NotFound
from models import TITLE_CHARS, Conversation, Message, as_datetime, connection, utcnow
from journal import NoJournal
from redis_link import LocalTrip, scope

__all__ = ["History", "TITLE_CHARS"]

PRUNE_BATCH = 500


class History:
    """Reads and changes the kept conversations; deletion holds the conversation like a turn does.

    Conversation ids are per user: every operation names the user's own.
    """

    def __init__(self, cache, coordination, round_trip=LocalTrip, journal=None, recover=None):
        """Wire the history to the cache and the journal (what to drop), the coordination (leases), and
        `recover(user, conversation_id)`, which saves a turn a process that died left in a conversation."""
        self.cache = cache
        self.coordination = coordination
        self.round_trip = round_trip
        self.journal = journal or NoJournal()
        self.recover = recover or (lambda user, conversation_id: None)

    def conversations(self, user, limit, after=None):
        """A page of the user's conversations, newest activity first, and the position after it (or None).

        `after` is the (updated_at, id) position a previous page ended at.
        """
        with connection():
            page = Conversation.page_of(user, limit + 1, after)
        following = None
        if len(page) > limit:
            page = page[:limit]
            following = [as_datetime(page[-1].updated_at).isoformat(), page[-1].id]
        return [c.as_json() for c in page], following

    def conversation(self, user, conversation_id, limit, after=0):
        """A conversation, a page of its messages in order, and the position after it (or None).

        A turn a process that died left is saved first, so it is there (a conversation's first one included).
        """
        self.recover(user, conversation_id)
        with connection():
            conversation = self._owned(user, conversation_id)
            page = Message.page_of(conversation.key, limit + 1, after)
            count = Message.count_in(conversation.key)
        following = page[limit - 1].id if len(page) > limit else None
        return conversation.as_json(count), [m.as_json() for m in page[:limit]], following

    def rename(self, user, conversation_id, title):
        """Give the user's conversation a new title (checked by the caller); the conversation as shown.

        A turn a process that died left is saved first, as for reading it.
        """
        self.recover(user, conversation_id)
        with connection():
            conversation = self._owned(user, conversation_id)
            conversation.title = title.strip()
            conversation.save()
            count = Message.count_in(conversation.key)
        return conversation.as_json(count)

    def delete(self, user, conversation_id):
        """Delete the user's conversation and its messages, from the database and the cache.

        A turn in progress (a conversation's first one included) makes it busy.
        """
        name = scope(user, conversation_id)
        with self.round_trip() as trip:
            taken = self.coordination.take(name, "delete", trip)
        lease = taken.value
        if lease is None:
            raise ConversationBusy()
        try:
            with connection():
                Conversation.remove([self._owned(user, conversation_id).key])
            self.cache.drop([name])
            self.journal.drop([name])
        finally:
            lease.release()

    def stale(self, idle):
        """How many conversations, and messages in them, have had no activity for `idle` (a timedelta)."""
        with connection():
            return Conversation.count_stale(utcnow() - idle)

    def prune(self, idle):
        """Delete every conversation with no activity for `idle` (a timedelta); how many were deleted."""
        with connection():
            stale = Conversation.older_than(utcnow() - idle)
        removed = 0
        for start in range(0, len(stale), PRUNE_BATCH):
            removed += self._prune_batch(stale[start:start + PRUNE_BATCH])
        return removed

    def _prune_batch(self, batch):
        """Delete the conversations of a batch that no turn holds now (a busy one waits for the next prune)."""
        with self.round_trip() as trip:
            taken = [(row, self.coordination.take(scope(row[1], row[2]), "prune", trip)) for row in batch]
        held = [(row, pending.value) for row, pending in taken if pending.value is not None]
        try:
            with connection():
                removed = Conversation.remove([key for (key, _, _), _ in held])
            names = [scope(owner, conversation_id) for (_, owner, conversation_id), _ in held]
            self.cache.drop(names)
            self.journal.drop(names)
            return removed
        finally:
            with self.round_trip() as trip:
                for _, lease in held:
                    lease.release(trip)

    @staticmethod
    def _owned(user, conversation_id):
        """The user's conversation of that id, or 404."""
        conversation = Conversation.owned(user, conversation_id)
        if conversation is None:
            raise NotFound()
        return conversation

