"""How the service's parts are: what /status reports of the database, the cache and the model."""

import logging
import threading
import time

from models import backend_name, ping, retried_once
from outages import Unavailable

log = logging.getLogger(__name__)


class Health:
    """Checks each part the service depends on, with its round-trip time, at most once every `every` seconds.

    A flood of /status costs one database query and one Redis round trip a second per
    process: requests in between get the last report, and requests that arrive while a check
    runs wait for it rather than start their own.
    """

    def __init__(self, cache, coordination, describe_model, every=1.0, meter=None):
        """Report on `cache`, on who sees turn leases (`coordination`) and on the model `describe_model()` tells of.

        `meter` is told how they are.
        """
        self.cache = cache
        self.coordination = coordination
        self.meter = meter
        self.describe_model = describe_model
        self.every = every
        self._checking = threading.Lock()
        self._last, self._checked_at = None, -float("inf")

    def report(self):
        """The status of the service and of each part, as /status shows it."""
        if time.monotonic() - self._checked_at < self.every:
            return self._last
        with self._checking:
            if time.monotonic() - self._checked_at >= self.every:
                self._last, self._checked_at = self._check(), time.monotonic()
                if self.meter is not None:
                    self.meter.parts(self._last)
            return self._last

    def _check(self):
        """Check each part now."""
        database = probe(lambda: retried_once(ping))
        cache_state = probe(self.cache.ping)
        healthy = database["state"] == cache_state["state"] == "ok"
        return {"status": "ok" if healthy else "degraded",
                "database": {**database, "backend": backend_name()},
                "cache": {**cache_state, "backend": self.cache.backend,
                          "turn_leases": self._turn_leases(cache_state)},
                "model": self.describe_model()}

    def _turn_leases(self, cache_state):
        """Who sees a turn's hold on its conversation: "shared" by every process and instance, or "per_process"."""
        shared = self.coordination.backend == "redis" and cache_state["state"] == "ok"
        return "shared" if shared else "per_process"


def probe(check):
    """{"state": "ok", "round_trip_ms": ...} if `check` succeeds, else {"state": "unavailable", "reason": why}."""
    started = time.monotonic()
    try:
        check()
    except Unavailable as exc:  # the part's outage logged why, once
        return {"state": "unavailable", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - any failure is what /status reports
        log.warning("status check failed: %s", type(exc).__name__)
        return {"state": "unavailable", "reason": f"the check failed unexpectedly ({type(exc).__name__})"}
    return {"state": "ok", "round_trip_ms": round((time.monotonic() - started) * 1000, 2)}
