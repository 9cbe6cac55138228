"""Rounds a process makes every so often, in a thread of its own: model streams gone silent, feeds with no news."""

import logging
import threading
import time

from gevent import monkey

log = logging.getLogger(__name__)


def threads_are_greenlets():
    """Whether gevent has patched threading here: a thread then runs until it waits, never cut off in between."""
    return monkey.is_module_patched("threading")


class Patrol:
    """Looks at every watched item each `tick` seconds, in a daemon thread of this process.

    `look(item, value, now)` is called with what the item was watched with; it says whether to
    go on watching it. The thread starts with the first item a process watches (a fork keeps
    the object, not its thread), and again if it ever died.
    """

    def __init__(self, look, tick):
        """Nothing watched yet; look at each item with `look`, every `tick` seconds."""
        self._look = look
        self.tick = tick
        self._items = {}
        self._lock = threading.Lock()
        self._thread = None

    def watch(self, item, value=None, tick=None):
        """Look at `item` (with `value`) from now on; a `tick` shorter than the patrol's makes the rounds closer."""
        with self._lock:
            self._items[item] = value
            if tick is not None:
                self.tick = min(self.tick, tick)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True)
                self._thread.start()

    def _run(self):
        """Make the rounds, for ever (if the thread is ever killed, the next watch starts another)."""
        try:
            self._rounds()
        finally:
            with self._lock:
                self._thread = None

    def _rounds(self):
        """Look at every watched item each tick."""
        while True:
            time.sleep(self.tick)
            now = time.monotonic()
            with self._lock:
                watched = list(self._items.items())
            for item, value in watched:
                try:
                    still = self._look(item, value, now)
                except Exception:  # noqa: BLE001 - one item's failure must not leave the others unwatched
                    log.exception("a patrol could not look at %r", item)
                    still = False
                if not still:
                    with self._lock:
                        self._items.pop(item, None)
