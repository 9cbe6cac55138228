"""How the service's parts are: what /status reports of the database, the cache and the model."""

import logging
import threading
import time

from models import backend_name, ping, retried_once

log = logging.getLogger(__name__)


class Health:
    """Checks each part the service depends on, with its round-trip time, at most once every `every` seconds.

    A flood of /status costs one database query and one Redis round trip a second per
    process: requests in between get the last report, and requests that arrive while a check
    runs wait for it rather than start their own.
    """

    def __init__(self, cache, describe_model, every=1.0, meter=None):
        """Report on `cache` and on the model `describe_model()` tells of (and tell `meter` how they are)."""
        self.cache = cache
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
                "cache": {**cache_state, "backend": self.cache.backend},
                "model": self.describe_model()}


def probe(check):
    """{"state": "ok", "round_trip_ms": ...} if `check` succeeds, else {"state": "unavailable"}."""
    started = time.monotonic()
    try:
        check()
    except Exception as exc:  # noqa: BLE001 - any failure is what /status reports
        log.warning("status check failed: %s", type(exc).__name__)
        return {"state": "unavailable"}
    return {"state": "ok", "round_trip_ms": round((time.monotonic() - started) * 1000, 2)}
