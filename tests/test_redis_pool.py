"""The Redis connection pool: a command waits for a free connection, never fails because the pool is full."""

import json
import subprocess
import sys
import threading

from redis_link import RedisLink
from tests.helpers import ROOT, wait_until

HELD_SECONDS = 0.8  # under the one-second socket timeout


def hold_connections(link, redis_client, count):
    """`count` threads, each holding one of the link's connections in a BLPOP until its key is pushed; once all block."""
    threads = [threading.Thread(target=link.call, args=(link.client.blpop, [f"held:{n}"], HELD_SECONDS))
               for n in range(count)]
    for thread in threads:
        thread.start()
    assert wait_until(lambda: redis_client.info("clients")["blocked_clients"] == count, timeout=10)
    return threads


def test_a_command_waits_for_a_connection_while_every_one_is_in_use(redis_url, redis_client):
    """With both connections of a pool of two in use, a third command waits, then goes through on a freed one."""
    link = RedisLink(redis_url, pool_size=2)
    holders = hold_connections(link, redis_client, 2)
    done = []
    waiter = threading.Thread(target=lambda: done.append(link.call(link.client.set, "waited", "yes")))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and done == []  # waiting for a connection, not failed
    redis_client.lpush("held:0", "go")
    waiter.join(10)
    assert done == [True]
    assert redis_client.get("waited") == "yes"
    for holder in holders:
        holder.join(10)
    assert link.outage.reason is None


BURST = """
from gevent import monkey; monkey.patch_all()
import json, sys
import gevent
from redis_link import RedisLink
link = RedisLink(sys.argv[1], pool_size=20)
answers = gevent.joinall([gevent.spawn(link.call, link.client.incr, "burst") for _ in range(300)])
print(json.dumps({"answers": sorted(answer.value for answer in answers if answer.successful()),
                  "failures": [type(answer.exception).__name__ for answer in answers if not answer.successful()],
                  "outage": link.outage.reason}))
"""


def test_a_burst_of_greenlets_past_the_pool_all_get_through(redis_url, redis_client):
    """Three hundred greenlets of one gevent process asking at once (each holds a connection until Redis answers,
    more than redis-py's own pool lets through) all get their answer, and no outage is told."""
    finished = subprocess.run([sys.executable, "-c", BURST, redis_url], cwd=ROOT, capture_output=True, text=True,
                              timeout=60, check=False)
    assert finished.returncode == 0, finished.stderr
    result = json.loads(finished.stdout)
    assert result == {"answers": list(range(1, 301)), "failures": [], "outage": None}
    assert "cannot be used" not in finished.stderr
