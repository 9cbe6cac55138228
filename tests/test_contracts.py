"""The cache and the coordination between processes: one contract, kept by the Redis and in-process backends."""

import pytest

from cache import ConversationCache, MemoryCache, RedisCache
from coordination import LOCK_KEY, Coordination, MemoryCoordination, RedisCoordination
from redis_link import LocalTrip, RedisLink
from tests.helpers import commands_sent, free_port, wait_until


@pytest.fixture(params=["redis", "memory"])
def shared(request):
    """(cache, coordination, round trip) of each backend; Redis's on the emptied test database."""
    if request.param == "memory":
        return MemoryCache(60), MemoryCoordination(), LocalTrip
    link = RedisLink(request.getfixturevalue("redis_url"))
    request.getfixturevalue("redis_client")
    return RedisCache(link, 60), RedisCoordination(link), link.round_trip


@pytest.fixture
def unreachable():
    """The Redis backends on a port where nothing listens."""
    link = RedisLink(f"redis://127.0.0.1:{free_port()}/0")
    return RedisCache(link, 60), RedisCoordination(link), link.round_trip


def sent(round_trip, command):
    """The value of one command sent in a round trip of its own."""
    with round_trip() as trip:
        pending = command(trip)
    return pending.value


def test_both_backends_implement_the_protocols(shared):
    """Each backend has every method its protocol names."""
    conversation_cache, coordination, _ = shared
    assert isinstance(conversation_cache, ConversationCache)
    assert isinstance(coordination, Coordination)


def test_a_conversation_not_cached_reads_as_none(shared):
    """A miss is None."""
    conversation_cache, _, round_trip = shared
    assert sent(round_trip, lambda trip: conversation_cache.read("c1", trip)) is None


def test_a_written_copy_reads_back_until_dropped(shared):
    """What is written is read back, and gone once dropped."""
    conversation_cache, _, round_trip = shared
    sent(round_trip, lambda trip: conversation_cache.write("c1", '{"copy": 1}', trip))
    assert sent(round_trip, lambda trip: conversation_cache.read("c1", trip)) == '{"copy": 1}'
    conversation_cache.drop(["c1"])
    assert sent(round_trip, lambda trip: conversation_cache.read("c1", trip)) is None


def test_one_round_trip_carries_a_lease_and_a_copy(shared):
    """A lease taken and a copy read in the same round trip both have their values after it."""
    conversation_cache, coordination, round_trip = shared
    sent(round_trip, lambda trip: conversation_cache.write("c1", "copy", trip))
    with round_trip() as trip:
        taken = coordination.take("c1", "run", trip)
        copy = conversation_cache.read("c1", trip)
    assert taken.value is not None and copy.value == "copy"


def test_a_held_conversation_cannot_be_taken_again(shared):
    """While one lease holds a conversation, another take gets None; after release it succeeds."""
    _, coordination, round_trip = shared
    lease = sent(round_trip, lambda trip: coordination.take("c1", "run", trip))
    assert sent(round_trip, lambda trip: coordination.take("c1", "run", trip)) is None
    lease.release()
    assert sent(round_trip, lambda trip: coordination.take("c1", "run", trip)) is not None


def test_a_lease_can_be_released_in_a_round_trip_with_a_write(shared):
    """The release rides with the copy's write; both take effect."""
    conversation_cache, coordination, round_trip = shared
    lease = sent(round_trip, lambda trip: coordination.take("c1", "run", trip))
    with round_trip() as trip:
        conversation_cache.write("c1", "after", trip)
        lease.release(trip)
    assert coordination.holder_of("c1") is None
    assert sent(round_trip, lambda trip: conversation_cache.read("c1", trip)) == "after"


def test_the_holder_is_known_while_the_lease_lasts(shared):
    """holder_of names what the lease was taken for."""
    _, coordination, round_trip = shared
    lease = sent(round_trip, lambda trip: coordination.take("c1", "stream", trip))
    assert coordination.holder_of("c1") == "stream"
    lease.release()
    assert coordination.holder_of("c1") is None


def test_a_held_lease_is_renewed_past_its_expiry(shared):
    """The keeper renews a lease for as long as it is held: it outlives several expiries."""
    _, coordination, round_trip = shared
    coordination.keeper.seconds = coordination.lease_seconds = 0.3
    lease = sent(round_trip, lambda trip: coordination.take("c1", "run", trip))
    assert not wait_until(lambda: coordination.holder_of("c1") is None, timeout=1.2)
    lease.release()
    assert coordination.holder_of("c1") is None


def test_the_keeper_renews_every_lease_and_slot_but_one_lost_meanwhile(shared):
    """Many leases and stream slots held at once are all renewed, each by its own token: a lease that lapsed and
    was taken by another turn meanwhile (this process stalled) stays the other turn's."""
    _, coordination, round_trip = shared
    coordination.keeper.seconds = coordination.lease_seconds = 0.5
    leases = [sent(round_trip, lambda trip, n=n: coordination.take(f"c{n}", "stream", trip)) for n in range(30)]
    slots = [sent(round_trip, lambda trip: coordination.open_stream("alice", 100, trip)) for _ in range(30)]
    stalled = leases.pop()
    coordination.keeper.forget(stalled)
    assert wait_until(lambda: coordination.holder_of("c29") is None, timeout=5)
    other = sent(round_trip, lambda trip: coordination.take("c29", "run", trip))
    coordination.keeper.keep(stalled)
    coordination.keeper.renew()
    assert coordination.holder_of("c29") == "run"
    assert [sent(round_trip, lease.renew) for lease in leases] == [True] * 29
    assert [sent(round_trip, slot.renew) for slot in slots] == [True] * 30
    assert sent(round_trip, stalled.renew) is False
    other.release()


def test_the_keeper_renews_what_a_process_holds_in_one_command_a_kind(redis_url, redis_client):
    """However many leases and slots a process holds, a renewal costs Redis one command for each kind."""
    link = RedisLink(redis_url)
    coordination = RedisCoordination(link)
    for n in range(50):
        sent(link.round_trip, lambda trip, n=n: coordination.take(f"c{n}", "stream", trip))
        sent(link.round_trip, lambda trip: coordination.open_stream("alice", 100, trip))
    with commands_sent(redis_url) as counted:
        coordination.keeper.renew()
    assert counted["EVAL"] + counted["EVALSHA"] == 2, counted


def test_a_lease_nobody_renews_expires(shared):
    """A lease its keeper no longer renews (its process died) lapses within the expiry."""
    _, coordination, round_trip = shared
    coordination.lease_seconds = 0.3
    lease = sent(round_trip, lambda trip: coordination.take("c1", "run", trip))
    coordination.keeper.forget(lease)  # as if the holder's process had died
    assert wait_until(lambda: coordination.holder_of("c1") is None, timeout=5)


def test_stream_slots_are_counted_per_user_up_to_the_limit(shared):
    """A user gets `limit` slots, then None; a released slot is free again; another user has their own."""
    _, coordination, round_trip = shared
    slots = [sent(round_trip, lambda trip: coordination.open_stream("alice", 2, trip)) for _ in range(3)]
    assert slots[0] is not None and slots[1] is not None and slots[2] is None
    assert sent(round_trip, lambda trip: coordination.open_stream("bob", 2, trip)) is not None
    slots[0].release()
    assert sent(round_trip, lambda trip: coordination.open_stream("alice", 2, trip)) is not None


def test_a_turn_is_watched_while_a_reader_holds_a_watch(shared):
    """watched() is true while any reader of the turn holds a watch, and false after."""
    _, coordination, round_trip = shared
    assert not coordination.watched("t1")
    watch = sent(round_trip, lambda trip: coordination.watch("t1", trip))
    assert coordination.watched("t1") and not coordination.watched("t2")
    watch.release()
    assert not coordination.watched("t1")


def test_requests_are_counted_per_user_in_this_and_the_previous_window(shared):
    """Each count adds one for its user only; the previous window's count comes with it."""
    _, coordination, _ = shared
    counts = [coordination.count_request("alice", 60, 600.0) for _ in range(3)]
    assert counts == [(0, 1), (0, 2), (0, 3)]
    assert coordination.count_request("bob", 60, 600.0) == (0, 1)
    assert coordination.count_request("alice", 60, 660.0) == (3, 1)


def test_a_published_stop_reaches_the_listener(shared):
    """A stop published for a conversation is delivered to the listener."""
    _, coordination, _ = shared
    heard = []
    coordination.listen_for_stops(heard.append)
    assert wait_until(lambda: (coordination.publish_stop("c1"), heard)[1], timeout=10, interval=0.2)
    assert set(heard) == {"c1"}


def test_an_error_redis_answers_to_one_command_does_not_make_the_process_give_up_on_it(redis_url, redis_client):
    """WRONGTYPE to one command is that command's failure, not an outage: the next turn's lease is still
    taken in Redis, and Redis still answers a ping."""
    link = RedisLink(redis_url)
    coordination = RedisCoordination(link)
    redis_client.hset(LOCK_KEY.format("c1"), "not", "a lease")
    assert coordination.holder_of("c1") is None  # WRONGTYPE: the in-process leases answer
    lease = sent(link.round_trip, lambda trip: coordination.take("c2", "run", trip))
    assert redis_client.get(LOCK_KEY.format("c2")) is not None
    link.ping()
    assert link.outage.reason is None
    lease.release()


def test_without_redis_a_read_is_a_miss(unreachable):
    """Redis down: the cache reads nothing, and nothing raises."""
    conversation_cache, _, round_trip = unreachable
    assert sent(round_trip, lambda trip: conversation_cache.read("c1", trip)) is None


def test_without_redis_a_lease_is_held_in_the_process(unreachable):
    """Redis down: a lease is still taken, and the process refuses a second one."""
    _, coordination, round_trip = unreachable
    lease = sent(round_trip, lambda trip: coordination.take("c1", "run", trip))
    assert lease is not None
    assert sent(round_trip, lambda trip: coordination.take("c1", "run", trip)) is None
    lease.release()
    assert sent(round_trip, lambda trip: coordination.take("c1", "run", trip)) is not None


def test_without_redis_requests_are_counted_in_the_process(unreachable):
    """Redis down: the rate count goes on in the process."""
    _, coordination, _ = unreachable
    assert [coordination.count_request("alice", 60, 600.0) for _ in range(2)] == [(0, 1), (0, 2)]
