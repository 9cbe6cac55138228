"""gunicorn settings of the floors (chat_app.py, bare.py): gunicorn's own gevent worker, one worker."""

import os

bind = f"127.0.0.1:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
worker_class = "gevent"
worker_connections = 4000
accesslog = None
errorlog = "-"
loglevel = "warning"
control_socket_disable = True


def post_worker_init(worker):
    """Once gevent has patched the worker: psycopg2 waits in gevent's loop, not in C, and what was loaded is left out
    of garbage collection (as the service's workers do)."""
    import gc

    from psycogreen.gevent import patch_psycopg

    patch_psycopg()
    gc.freeze()
