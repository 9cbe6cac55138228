"""The rounds a process makes in a thread of its own (patrol.py): what it looks at, and that one failure stops none."""

import threading

from patrol import Patrol
from tests.helpers import wait_until


class Watched:
    """Something a patrol looks at: it notes each look, and fails at it if told to."""

    def __init__(self, fails=False, looks_wanted=1):
        """Not looked at yet."""
        self.fails, self.looks_wanted, self.looks = fails, looks_wanted, 0
        self.looked = threading.Event()

    def look(self, value, now):
        """Be looked at: still watched until looked at enough times."""
        self.looks += 1
        self.looked.set()
        if self.fails:
            raise AttributeError("'SSLTransport' object has no attribute 'shutdown'")
        return self.looks < self.looks_wanted


def patrol(tick=0.01):
    """A patrol that looks at Watched items."""
    return Patrol(lambda item, value, now: item.look(value, now), tick=tick)


def test_a_patrol_outlives_an_item_it_cannot_look_at():
    """One item whose look fails leaves the patrol looking at every other."""
    rounds = patrol()
    failing, other = Watched(fails=True), Watched()
    rounds.watch(failing)
    assert failing.looked.wait(5)
    rounds.watch(other)
    assert other.looked.wait(5)


def test_an_item_is_looked_at_until_it_says_enough():
    """Looked at round after round while it asks to be, then never again."""
    rounds = patrol()
    item = Watched(looks_wanted=3)
    rounds.watch(item, "value")
    watcher = Watched(looks_wanted=50)  # a later item: rounds go on after the first one left
    rounds.watch(watcher)
    assert wait_until(lambda: watcher.looks >= 20, timeout=5)
    assert item.looks == 3
