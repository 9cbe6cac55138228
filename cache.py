"""The conversation cache: a conversation's owner and recent messages, with a TTL.

Redis when `REDIS_URL` is set, otherwise a dict in this process. The cache is only
ever a copy of the database: a miss (expired, evicted, flushed) is filled from it.
"""

import json
import threading
import time

import redis

KEY = "chat:conversation:{}"

# Replace the cached value only if it is still the one the turn read; otherwise drop
# it, so a turn that raced with another never writes a history missing the other's messages.
_REPLACE_IF_UNCHANGED = """
local current = redis.call('GET', KEYS[1])
if (current == false and ARGV[1] == '') or current == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
    return 1
end
redis.call('DEL', KEYS[1])
return 0
"""


def encode(owner, messages):
    """The cached form of a conversation."""
    return json.dumps({"owner": owner, "messages": messages}, ensure_ascii=False)


def decode(raw):
    """The (owner, messages) of a cached conversation, or None for a miss."""
    if raw is None:
        return None
    value = json.loads(raw)
    return value["owner"], value["messages"]


class RedisCache:
    """Conversations cached in Redis, shared by every process of the service."""

    backend = "redis"

    def __init__(self, url, ttl):
        """Connect lazily to the Redis at `url`."""
        self.client = redis.Redis.from_url(url, decode_responses=True,
                                           socket_timeout=1, socket_connect_timeout=1,
                                           health_check_interval=30)
        self.ttl = ttl
        self._replace = self.client.register_script(_REPLACE_IF_UNCHANGED)

    def get(self, conversation_id):
        """The raw cached conversation, or None."""
        return self.client.get(KEY.format(conversation_id))

    def replace(self, conversation_id, expected, new):
        """Store `new` if the cached value is still `expected` (None: absent); else drop it."""
        self._replace(keys=[KEY.format(conversation_id)], args=[expected or "", new, self.ttl])

    def ping(self):
        """Raise if Redis cannot be reached."""
        self.client.ping()


class MemoryCache:
    """Conversations cached in this process: the embedded default for one process."""

    backend = "memory"

    def __init__(self, ttl):
        """An empty cache whose entries live `ttl` seconds."""
        self.ttl = ttl
        self._entries = {}
        self._lock = threading.Lock()

    def get(self, conversation_id):
        """The raw cached conversation, or None."""
        entry = self._entries.get(conversation_id)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def replace(self, conversation_id, expected, new):
        """Store `new` if the cached value is still `expected` (None: absent); else drop it."""
        with self._lock:
            if self.get(conversation_id) == expected:
                self._entries[conversation_id] = (new, time.monotonic() + self.ttl)
            else:
                self._entries.pop(conversation_id, None)

    def ping(self):
        """Always reachable."""


def make_cache(redis_url, ttl):
    """The cache the configuration asks for."""
    return RedisCache(redis_url, ttl) if redis_url else MemoryCache(ttl)
