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


def test_a_part_that_flaps_is_said_once_a_minute_at_most(said, monkeypatch):
    """Outages that begin within QUIET_SECONDS of the last one said are not said, nor their end."""
    now = [1000.0]
    monkeypatch.setattr(outages.time, "monotonic", lambda: now[0])
    database = Outage("The database")
    for _ in range(5):
        database.failed("the server closed the connection")
        database.recovered()
        now[0] += 10
    assert said() == ["The database cannot be used: the server closed the connection",
                      "The database is reachable again"]
    now[0] += outages.QUIET_SECONDS
    database.failed("connection refused")
    assert said()[-1] == "The database cannot be used: connection refused"
    assert database.reason == "connection refused"
