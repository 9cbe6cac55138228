"""What the service counts for Prometheus: requests, turns, time to first token, tokens, open streams, model errors.

The official prometheus_client, in its multiprocess mode under gunicorn (gunicorn.conf.py
gives every worker one PROMETHEUS_MULTIPROC_DIR and clears it), so GET /metrics sums the
workers. Labels never carry a user id or any text of a message: routes are URL rules
(`/conversations/<conversation_id>`), models are model names, codes are error codes.
"""

import os

from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)
from prometheus_client import multiprocess

METHODS = {"GET", "HEAD", "POST", "PATCH", "DELETE", "OPTIONS", "PUT"}
MAX_MODELS = 20
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter("chat_requests", "HTTP requests answered, by route, method and status",
                   ["route", "method", "status"])
TURNS = Counter("chat_turns", "Chat turns ended, by kind (run, stream) and outcome", ["kind", "outcome"])
FIRST_TOKEN = Histogram("chat_time_to_first_token_seconds", "From the request to the first chunk of a streamed reply",
                        buckets=LATENCY_BUCKETS)
TURN_DURATION = Histogram("chat_turn_duration_seconds", "From the request to the end of a turn, by kind", ["kind"],
                          buckets=DURATION_BUCKETS)
TOKENS = Counter("chat_tokens", "Tokens of turns, by model and type (prompt, completion)", ["model", "type"])
OPEN_STREAMS = Gauge("chat_open_streams", "Streams being read by a client now", multiprocess_mode="livesum")
MODEL_ERRORS = Counter("chat_model_errors", "Failures of the model, by error code", ["code"])
# The check made last, by whichever worker, says how a part is: another worker's older 1 must not hide an outage.
UP = Gauge("chat_part_up", "Whether a part the service depends on answers (1) or not (0), by part", ["part"],
           multiprocess_mode="livemostrecent")


class Meter:
    """Counts what happens, or nothing at all when metrics are off (METRICS=off)."""

    def __init__(self, enabled=True):
        """Count if `enabled`."""
        self.enabled = enabled
        self._requests = {}
        self._models = set()

    def request(self, route, method, status):
        """One request answered (a method no route has counts as "other": clients choose it)."""
        if self.enabled:
            key = (route, method if method in METHODS else "other", status)
            counter = self._requests.get(key)
            if counter is None:
                counter = self._requests[key] = REQUESTS.labels(key[0], key[1], str(status))
            counter.inc()

    def turn(self, kind, outcome, duration, first_token=None, model=None, prompt_tokens=None,
             completion_tokens=None):
        """One turn ended: how, how long it took, and what it cost."""
        if not self.enabled:
            return
        TURNS.labels(kind, outcome).inc()
        TURN_DURATION.labels(kind).observe(duration)
        if first_token is not None:
            FIRST_TOKEN.observe(first_token)
        if model:
            model = self._model_label(model)
            if prompt_tokens:
                TOKENS.labels(model, "prompt").inc(prompt_tokens)
            if completion_tokens:
                TOKENS.labels(model, "completion").inc(completion_tokens)

    def _model_label(self, model):
        """The model's name as a label; past MAX_MODELS names (a server that names every reply), "other"."""
        if model in self._models or len(self._models) < MAX_MODELS:
            self._models.add(model)
            return model
        return "other"

    def model_error(self, code):
        """The model failed with `code`."""
        if self.enabled:
            MODEL_ERRORS.labels(code).inc()

    def stream_opened(self):
        """A client began reading a stream."""
        if self.enabled:
            OPEN_STREAMS.inc()

    def stream_closed(self):
        """A client stopped reading a stream."""
        if self.enabled:
            OPEN_STREAMS.dec()

    def parts(self, report):
        """Whether the database and the cache answer, from a health report."""
        if self.enabled:
            for part in ("database", "cache"):
                UP.labels(part).set(1 if report[part]["state"] == "ok" else 0)


def exposition():
    """(body, content type) of every metric, summed over the workers in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
