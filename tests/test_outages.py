"""What the log says of a part that cannot be used: once an outage, and once when it ends, however it flaps."""

import logging

import pytest

import outages
from outages import Outage


@pytest.fixture
def said(caplog):
    """The messages the outages logger writes during the test."""
    caplog.set_level(logging.INFO, logger="outages")
    return lambda: [record.getMessage() for record in caplog.records if record.name == "outages"]


def test_an_outage_is_said_once_with_its_first_reason_and_once_when_it_ends(said):
    """Many failures, then many successes: two lines; /status gets the latest reason meanwhile."""
    redis = Outage("Redis", "Until it is back, turns are guarded per process only")
    for reason in ("connection refused", "connection refused", "timed out"):
        redis.failed(reason)
    assert redis.reason == "timed out"
    for _ in range(3):
        redis.recovered()
    assert redis.reason is None
    assert said() == ["Redis cannot be used: connection refused. Until it is back, turns are guarded per process only",
                      "Redis is reachable again"]


@pytest.fixture
def clock(monkeypatch):
    """The outages' clock, moved on by hand: `clock[0]` is now."""
    now = [1000.0]
    monkeypatch.setattr(outages.time, "monotonic", lambda: now[0])
    return now


def test_a_part_that_flaps_is_said_once_a_minute_at_most(said, clock):
    """Outages that begin and end within QUIET_SECONDS of the last one said are not said, nor their end."""
    database = Outage("The database")
    for _ in range(5):
        database.failed("the server closed the connection")
        database.recovered()
        clock[0] += 10
    assert said() == ["The database cannot be used: the server closed the connection",
                      "The database is reachable again"]
    clock[0] += outages.QUIET_SECONDS
    database.failed("connection refused")
    assert said()[-1] == "The database cannot be used: connection refused"
    assert database.reason == "connection refused"


def test_an_outage_that_begins_in_the_quiet_minute_and_lasts_is_said_when_the_minute_is_up(said, clock):
    """Fail, recover, then fail for good: the lasting outage is said at its first failure after the minute,
    so the log's last word is that the part cannot be used (and what the service does meanwhile)."""
    redis = Outage("Redis", "Until it is back, turns are guarded per process only")
    redis.failed("connection refused")
    redis.recovered()
    clock[0] += 1
    for _ in range(7):  # the seventh comes a minute after the outage said
        redis.failed("authentication failed")
        clock[0] += 10
    assert said() == ["Redis cannot be used: connection refused. Until it is back, turns are guarded per process only",
                      "Redis is reachable again",
                      "Redis cannot be used: authentication failed. Until it is back, turns are guarded per process "
                      "only"]
    redis.failed("authentication failed")
    redis.recovered()
    assert said()[-2:] == ["Redis cannot be used: authentication failed. Until it is back, turns are guarded per "
                           "process only", "Redis is reachable again"]


def test_the_end_of_an_outage_never_said_is_not_said(said, clock):
    """An outage that began in the quiet minute and ended within it: neither its start nor its end is logged."""
    database = Outage("The database")
    database.failed("connection refused")
    database.recovered()
    clock[0] += 5
    database.failed("timed out")
    clock[0] += 5
    database.failed("timed out")
    database.recovered()
    assert said() == ["The database cannot be used: connection refused", "The database is reachable again"]
