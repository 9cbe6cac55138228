"""A user's conversations as the history API shows them: list, read, rename, delete, prune."""

from errors import ConversationBusy, NotFound
from models import TITLE_CHARS, Conversation, Message, as_datetime, connection, utcnow
from redis_link import LocalTrip

__all__ = ["History", "TITLE_CHARS"]

PRUNE_BATCH = 500


class History:
    """Reads and changes the kept conversations; deletion holds the conversation like a turn does."""

    def __init__(self, cache, coordination, round_trip=LocalTrip, lock_ttl=60):
        """Wire the history to the cache (copies to drop) and the coordination (leases)."""
        self.cache = cache
        self.coordination = coordination
        self.round_trip = round_trip
        self.lock_ttl = lock_ttl

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
        """A conversation, a page of its messages in order, and the position after it (or None)."""
        with connection():
            conversation = self._owned(conversation_id, user)
            page = Message.page_of(conversation_id, limit + 1, after)
            count = Message.count_in(conversation_id)
        following = page[limit - 1].id if len(page) > limit else None
        return conversation.as_json(count), [m.as_json() for m in page[:limit]], following

    def rename(self, user, conversation_id, title):
        """Give the user's conversation a new title (checked by the caller); the conversation as shown."""
        with connection():
            conversation = self._owned(conversation_id, user)
            conversation.title = title.strip()
            conversation.save()
            count = Message.count_in(conversation_id)
        return conversation.as_json(count)

    def delete(self, user, conversation_id):
        """Delete the user's conversation and its messages, from the database and the cache."""
        with connection():
            self._owned(conversation_id, user)
        with self.round_trip() as trip:
            taken = self.coordination.take(conversation_id, self.lock_ttl, f"delete {user}", trip)
        lease = taken.value
        if lease is None:
            raise ConversationBusy()
        try:
            with connection():
                Conversation.remove([conversation_id])
            self.cache.drop([conversation_id])
        finally:
            lease.release()

    def prune(self, idle):
        """Delete every conversation with no activity for `idle` (a timedelta); how many were deleted."""
        with connection():
            stale = Conversation.older_than(utcnow() - idle)
        removed = 0
        for start in range(0, len(stale), PRUNE_BATCH):
            batch = stale[start:start + PRUNE_BATCH]
            with connection():
                removed += Conversation.remove(batch)
            self.cache.drop(batch)
        return removed

    @staticmethod
    def _owned(conversation_id, user):
        """The user's conversation, or the 404 that also answers for anyone else's."""
        conversation = Conversation.owned(conversation_id, user)
        if conversation is None:
            raise NotFound()
        return conversation

