"""gunicorn settings: gevent workers, many connections each, configured by environment variables."""

import functools
import gc
import os
import shutil
import signal
import tempfile

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
# The in-process cache (no REDIS_URL) is one process's memory: more workers would each keep their own.
workers = int(os.environ.get("WEB_CONCURRENCY", "2")) if os.environ.get("REDIS_URL") else 1
# gevent's worker, with deadlines on slow clients (worker.py).
worker_class = "worker.Worker"
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "4000"))
# A gevent worker heartbeats from its own loop, so this only catches a worker stuck in C code.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
# Most PaaS routers allow 30 s between SIGTERM and SIGKILL.
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "25"))
keepalive = int(os.environ.get("KEEPALIVE_SECONDS", "75"))
# The service writes its own JSON line per request (logs.py), so no access log here.
accesslog = None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
# gunicorn's control socket is one path per user: several services on one host would share it.
control_socket_disable = True

# prometheus_client's multiprocess mode: every worker writes its metrics to files in one folder, and
# GET /metrics sums them. The folder is made here, before any worker imports prometheus_client,
# emptied when gunicorn starts, and removed when it exits (unless the operator named one).
# SIGHUP makes gunicorn read this file again in the same process, so the folder it made is noted
# in the environment, to be told from one the operator named. A master started by SIGUSR2 inherits
# that environment (and its listeners, GUNICORN_FD): the old master removes its folder when it
# exits, so the new one makes its own.
METRICS_DIR_MADE = "CHAT_METRICS_DIR_MADE"
named = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if not named or (named == os.environ.get(METRICS_DIR_MADE) and "GUNICORN_FD" in os.environ):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ[METRICS_DIR_MADE] = tempfile.mkdtemp(prefix="chat-metrics-")
METRICS_DIR_GIVEN = os.environ["PROMETHEUS_MULTIPROC_DIR"] != os.environ.get(METRICS_DIR_MADE)


def on_starting(server):
    """Start from no metrics: a folder the operator named may hold a previous run's files."""
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))


def child_exit(server, worker):
    """A worker is gone: its live gauges (open streams) no longer count."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove the metrics folder this configuration made."""
    if not METRICS_DIR_GIVEN:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


# Streams still open this long before the graceful timeout are ended by the service itself,
# with a final event and their partial reply saved, before gunicorn kills the worker.
DRAIN_MARGIN_SECONDS = 3


def post_worker_init(worker):
    """Make psycopg2 cooperative and streams drainable, once the worker's gevent has patched.

    post_fork runs before the gevent worker calls monkey.patch_all(), so it is too early.
    """
    make_psycopg_cooperative(worker.wsgi.config["DATABASE_TIMEOUT_SECONDS"])
    drain_streams_on_sigterm(worker)
    worker.wsgi.extensions["chat"].listen_for_stops()
    from chat_app import announce

    announce(worker.wsgi)
    keep_startup_objects_out_of_gc()


def keep_startup_objects_out_of_gc():
    """Leave what the worker loaded (modules, the app, its services) out of every later garbage collection.

    A full collection scans every object the process holds: with the app loaded and a few hundred
    streams open it took 25-35 ms, a pause every stream felt (measured by bench/run.py's relay
    phase: chunk lateness p99). Frozen, what lives as long as the worker is never scanned again.
    """
    gc.collect()
    gc.freeze()


def make_psycopg_cooperative(timeout):
    """psycogreen's wait callback, bounded: a database silent for `timeout` s fails the query.

    psycopg2 closes the connection when the callback raises, so the pool discards it.
    """
    from psycogreen.gevent import gevent_wait_callback
    from psycopg2 import extensions

    extensions.set_wait_callback(functools.partial(gevent_wait_callback, timeout=timeout))


def drain_streams_on_sigterm(worker):
    """On SIGTERM, stop as gunicorn does, and end the open streams before the graceful timeout."""
    service = worker.wsgi.extensions["chat"]
    grace = max(0.5, worker.cfg.graceful_timeout - DRAIN_MARGIN_SECONDS)

    def handle_sigterm(sig, frame):
        """gunicorn's own SIGTERM handling, then the stream deadline (nothing here may block)."""
        import gevent

        worker.handle_exit(sig, frame)
        gevent.spawn_later(grace, service.cut_open_streams)
        gevent.spawn_later(grace, worker.wsgi.extensions["replays"].stop_following)

    signal.signal(signal.SIGTERM, handle_sigterm)
