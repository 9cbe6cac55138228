"""The database pool: a checkout waits in line while every connection is in use, and gives up after its timeout."""

import threading
import time

import pytest

import models
from models import DatabaseUnavailable, connection
from tests.helpers import database_backends, wait_until


@pytest.fixture
def small_pool(postgres, postgres_url):
    """The models bound to a pool of one PostgreSQL connection whose checkouts wait at most half a second."""
    postgres.close_all()
    database = models.open_database(postgres_url, 1, 0.5)
    yield database
    database.close_all()


def hold_a_connection(release):
    """A thread that holds a connection of the pool until `release` is set; its `holding` event is set once it does."""
    holding = threading.Event()

    def hold():
        """Check out a connection, say so, and wait."""
        with connection():
            models.db.execute_sql("SELECT 1")
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    assert holding.wait(10)
    return thread


def test_a_checkout_waits_for_the_connection_in_use_and_gets_it(small_pool, postgres_url):
    """With the one connection in use, a second checkout waits, and goes on as soon as the first gives it back."""
    small_pool.init(small_pool.database, timeout=10)
    release = threading.Event()
    holder = hold_a_connection(release)
    got = []
    waiter = threading.Thread(target=lambda: got.append(connection_read()))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and got == []  # in line, not through
    release.set()
    holder.join(10)
    waiter.join(10)
    assert got == [1]
    assert database_backends(postgres_url) <= 1


def connection_read():
    """One read on a pooled connection."""
    with connection():
        return models.db.execute_sql("SELECT 1").fetchone()[0]


def test_a_checkout_gives_up_after_the_timeout_and_leaves_the_pool_whole(small_pool):
    """A checkout that waits longer than the pool's timeout is DatabaseUnavailable; the pool still has its
    connection afterwards (the place given up is not lost)."""
    release = threading.Event()
    holder = hold_a_connection(release)
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable):
        connection_read()
    assert time.monotonic() - started >= 0.4
    release.set()
    holder.join(10)
    assert [connection_read() for _ in range(3)] == [1, 1, 1]


def test_a_failed_connect_gives_its_place_back(postgres):
    """A database that cannot be reached fails every checkout at once: a failed connect does not keep its place,
    which would make the next checkout wait out the timeout instead."""
    database = models.open_database("postgresql://root@127.0.0.1:1/nowhere", 1, 5)
    try:
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable) as failure:
                connection_read()
            assert "Max connections" not in str(failure.value)
            assert time.monotonic() - started < 2
    finally:
        database.close_all()


def test_many_waiters_all_get_through_a_pool_of_one(small_pool, postgres_url):
    """Twenty threads wanting the one connection at once each get it in turn, within the timeout."""
    small_pool.init(small_pool.database, timeout=10)
    results = []
    threads = [threading.Thread(target=lambda: results.append(connection_read())) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert results == [1] * 20
    assert wait_until(lambda: database_backends(postgres_url) <= 1, timeout=5)


def test_twenty_threads_at_a_new_pool_share_one_gate(postgres, postgres_url):
    """The first checkouts of a new pool, from many threads at once, all wait at the same gate: the pool never
    holds more than its connections, and every place is given back."""
    postgres.close_all()
    database = models.open_database(postgres_url, 2, 10)
    try:
        start, results = threading.Barrier(20), []

        def read():
            """Wait for the others, then read."""
            start.wait(10)
            results.append(connection_read())

        threads = [threading.Thread(target=read) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert results == [1] * 20
        gate = database._gate()
        assert [gate.acquire(timeout=0) for _ in range(3)] == [True, True, False]  # every place back, and no more
        gate.release()
        gate.release()
        assert database_backends(postgres_url) <= 2
    finally:
        database.close_all()
