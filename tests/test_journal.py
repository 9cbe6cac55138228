"""A turn's journal: the Record replayed and recovered from its entries (pure Python), and its writer and
follower against the real Redis."""

import sse
from journal import Record, RedisJournal, last_record
from redis_link import RedisLink
from relay import Feed
from tests.helpers import commands_sent, wait_until
from turns import recovered_reply


def start(turn, message="hello"):
    """A turn's start entry's fields."""
    return {"turn": turn, "kind": "start", "message": message}


def batch(turn, first, *contents):
    """An events entry's fields: chunks of `contents`, numbered from `first`."""
    return {"turn": turn, "kind": "events", "first": str(first),
            "data": "\n".join(sse.chunk_data(content) for content in contents)}


def end(turn, n):
    """An end entry's fields: the final event, numbered `n`."""
    return {"turn": turn, "kind": "end", "n": str(n), "data": "final"}


def entries(*fields):
    """Journal entries (id, fields), in order."""
    return [(f"{n}-0", entry) for n, entry in enumerate(fields, start=1)]


def numbers(record):
    """The numbers of a record's events."""
    return [n for n, _ in record.events]


def test_a_record_takes_its_own_turns_batches_in_order():
    """Batches of one turn, interleaved with another's entries: the turn's events, numbered on."""
    record = Record(turn_id="t1")
    record.take(entries(start("t1", "hi"), batch("t1", 1, "a ", "b "), batch("t0", 7, "x"), batch("t1", 3, "c")))
    assert (record.message, numbers(record), record.gap, record.next_number()) == ("hi", [1, 2, 3], False, 4)
    assert record.last_entry == "4-0"


def test_a_missing_batch_is_a_gap():
    """Events 3 and 4 never reached the journal: the record says so."""
    record = Record(turn_id="t1")
    record.take(entries(start("t1"), batch("t1", 1, "a ", "b "), batch("t1", 5, "e")))
    assert record.gap


def test_a_batch_written_twice_is_taken_once():
    """A batch sent again after a write whose answer was lost (it went through) repeats nothing and is no gap."""
    record = Record(turn_id="t1")
    record.take(entries(start("t1"), batch("t1", 1, "a ", "b "), batch("t1", 1, "a ", "b "),
                        batch("t1", 2, "b ", "c ")))
    assert (numbers(record), record.gap) == ([1, 2, 3], False)
    assert recovered_reply(record) == "a b c "


def test_entries_after_the_end_are_not_part_of_the_turn():
    """A stalled writer's late batch after the turn's end changes neither its events nor its final event."""
    record = Record(turn_id="t1")
    record.take(entries(start("t1"), batch("t1", 1, "a "), end("t1", 2), batch("t1", 2, "late"), end("t1", 3)))
    assert (numbers(record), record.final) == ([1], (2, "final"))


def test_the_last_record_is_of_the_last_turn_not_abandoned():
    """A turn refused after its start (abandoned) leaves the turn before it as the last."""
    journal = entries(start("t1"), batch("t1", 1, "a "), end("t1", 2), start("t2"),
                      {"turn": "t2", "kind": "abandoned"})
    record = last_record(journal)
    assert (record.turn_id, numbers(record), record.final) == ("t1", [1], (2, "final"))


def test_a_journal_of_only_abandoned_turns_has_no_last_record():
    """Nothing to replay or recover when the only turn was refused."""
    assert last_record(entries(start("t1"), {"turn": "t1", "kind": "abandoned"})) is None


def test_the_recovered_reply_stops_at_the_first_gap():
    """What a dead process journaled, up to the first missing event: never a reply with a hole in it."""
    record = Record(turn_id="t1")
    record.take(entries(start("t1"), batch("t1", 1, "a ", "b "), batch("t1", 4, "d ")))
    assert recovered_reply(record) == "a b "


def test_a_failure_while_a_batch_is_queued_leaves_the_feed_unlocked(redis_url):
    """A bug while the writer queues a feed's batch must not leave the feed's journal lock held: the turn's end
    takes it, and would wait for ever."""
    writer = RedisJournal(RedisLink(redis_url), 300)
    feed = Feed("0123456789abcdef", "alice:c1", "c1")
    feed.unjournaled.append((1, None))  # not text: joining the batch fails
    writer.keep(feed, "chat:turn-lock:alice:c1", "0123456789abcdef stream")
    assert wait_until(lambda: not feed.unjournaled, timeout=5)  # the writer took the batch, and failed
    assert feed.journal_lock.acquire(timeout=2)
    feed.journal_lock.release()
    feed.end(sse.chunk_data(""))  # the writer lets go of it


def test_following_with_a_wait_under_a_millisecond_still_returns(redis_url):
    """A wait that rounds to 0 ms must not become XREAD BLOCK 0 (for ever): nothing comes, and it says so."""
    follower = RedisJournal(RedisLink(redis_url), 300)
    assert follower.follow("alice:nothing-here", "0", 0.0004) == []


def test_one_flush_writes_every_feed_whose_turn_holds_its_lease_in_one_command(redis_url, redis_client):
    """The writer journals many streamed turns in one command a flush; a turn that lost its lease is left out."""
    writer = RedisJournal(RedisLink(redis_url), 300)
    feeds = [Feed(f"{n:016x}", f"alice:c{n}", f"c{n}") for n in range(40)]
    for feed in feeds:
        lease_key, token = f"chat:turn-lock:{feed.name}", f"{feed.turn_id} stream"
        if feed is not feeds[-1]:  # the last turn's lease is another's now
            redis_client.set(lease_key, token)
        feed.add(sse.chunk_data("one"))
        feed.add(sse.chunk_data("two"))
        writer._feeds[feed] = (lease_key, token)
    with commands_sent(redis_url) as counted:
        writer._flush()
    assert counted["EVAL"] + counted["EVALSHA"] == 1, counted
    written = [redis_client.xrange(f"chat:journal:{feed.name}") for feed in feeds[:-1]]
    assert [[(fields["kind"], fields["first"], fields["data"].count("\n")) for _, fields in journal]
            for journal in written] == [[("events", "1", 1)]] * 39
    assert redis_client.exists(f"chat:journal:{feeds[-1].name}") == 0
    assert redis_client.pttl(f"chat:journal:{feeds[0].name}") > 0


def test_a_batch_redis_refuses_goes_again_alone(redis_url, redis_client):
    """A turn whose journal key Redis will not take (not a stream) keeps its events for the next flush; the other
    turns of the same flush are journaled."""
    writer = RedisJournal(RedisLink(redis_url), 300)
    feeds = [Feed(f"{n:016x}", f"alice:c{n}", f"c{n}") for n in range(3)]
    for feed in feeds:
        lease_key, token = f"chat:turn-lock:{feed.name}", f"{feed.turn_id} stream"
        redis_client.set(lease_key, token)
        feed.add(sse.chunk_data("one"))
        writer._feeds[feed] = (lease_key, token)
    redis_client.set(f"chat:journal:{feeds[1].name}", "not a stream")
    writer._flush()
    assert [len(feed.unjournaled) for feed in feeds] == [0, 1, 0]
    assert [redis_client.xlen(f"chat:journal:{feed.name}") for feed in (feeds[0], feeds[2])] == [1, 1]
    assert feeds[1] in writer._feeds
