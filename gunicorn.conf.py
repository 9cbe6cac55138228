"""gunicorn settings: gevent workers, many connections each, configured by environment variables."""

import os

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
# The in-process cache (no REDIS_URL) is one process's memory: more workers would each keep their own.
workers = int(os.environ.get("WEB_CONCURRENCY", "2")) if os.environ.get("REDIS_URL") else 1
worker_class = "gevent"
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "4000"))
# A gevent worker heartbeats from its own loop, so this only catches a worker stuck in C code.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
# Most PaaS routers allow 30 s between SIGTERM and SIGKILL.
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "25"))
keepalive = int(os.environ.get("KEEPALIVE_SECONDS", "75"))
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()


def post_worker_init(worker):
    """Make psycopg2 cooperative once the worker's gevent has patched the standard library.

    post_fork runs before the gevent worker calls monkey.patch_all(), so it is too early.
    """
    from psycogreen.gevent import patch_psycopg

    patch_psycopg()
