"""The history API: listing, reading, renaming and deleting conversations, on PostgreSQL + Redis."""

import datetime
import re

import pytest

import models
from tests.fake_llm import Script
from tests.helpers import (assert_error, bearer, cache_key, cursor_of, lease_key, message_counts, run, slow_stream)
from tests.sse_client import data_events, rest_of

ISO_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
MESSAGE_FIELDS = {"id", "role", "content", "status", "created_at", "token_count", "prompt_tokens"}
CONVERSATION_FIELDS = {"id", "title", "created_at", "updated_at", "message_count"}


def listing(client, user="alice", **params):
    """GET /conversations with `params`; the JSON body (asserting 200)."""
    response = client.get("/conversations", query_string=params, headers=bearer(user))
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def listed_ids(client, user="alice"):
    """The ids of the user's conversations, in the order listed."""
    return [c["id"] for c in listing(client, user, limit=100)["conversations"]]


def reading(client, conversation_id, user="alice", **params):
    """GET /conversations/<id> with `params`; the JSON body (asserting 200)."""
    response = client.get(f"/conversations/{conversation_id}", query_string=params, headers=bearer(user))
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def all_pages(fetch, key):
    """Follow next_cursor from the first page to the last: the pages' items, page by page.

    `fetch(**page)` gets one page; `page` names the cursor, except for the first.
    """
    pages, cursor = [], None
    while True:
        body = fetch(**({"cursor": cursor} if cursor else {}))
        pages.append(body[key])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 20, "next_cursor never ends"


@pytest.fixture
def five(pg_client, llm):
    """Five conversations of alice's, c0 oldest to c4 newest."""
    for n in range(5):
        run(pg_client, f"message {n}", f"c{n}")
    return ["c4", "c3", "c2", "c1", "c0"]


# GET /conversations

def test_list_shows_only_the_callers_conversations(pg_client, llm):
    """Each user sees exactly their own conversations."""
    run(pg_client, "a", "alice-1")
    run(pg_client, "b", "bob-1", user="bob")
    run(pg_client, "c", "alice-2")
    assert sorted(listed_ids(pg_client, "alice")) == ["alice-1", "alice-2"]
    assert listed_ids(pg_client, "bob") == ["bob-1"]
    assert listed_ids(pg_client, "carol") == []


def test_list_is_newest_activity_first(pg_client, five):
    """Conversations are listed most recently active first."""
    assert listed_ids(pg_client) == five


def test_a_new_turn_moves_a_conversation_to_the_top(pg_client, five):
    """The conversation that just got a turn is listed first; the others keep their order."""
    run(pg_client, "again", "c1")
    assert listed_ids(pg_client) == ["c1", "c4", "c3", "c2", "c0"]


def test_list_entry_has_id_title_times_and_message_count(pg_client, llm):
    """Each listed conversation has exactly id, title, ISO 8601 Z times and two messages a turn."""
    run(pg_client, "first", "c1")
    run(pg_client, "second", "c1")
    entry, = listing(pg_client)["conversations"]
    assert set(entry) == CONVERSATION_FIELDS
    assert (entry["id"], entry["title"], entry["message_count"]) == ("c1", "first", 4)
    assert ISO_Z.fullmatch(entry["created_at"]) and ISO_Z.fullmatch(entry["updated_at"])
    assert entry["created_at"] <= entry["updated_at"]


def test_list_pages_of_two_cover_five_conversations_without_gaps(pg_client, five):
    """limit=2 gives pages of 2, 2 and 1 in order, the last with a null next_cursor."""
    pages = all_pages(lambda **page: listing(pg_client, limit=2, **page), "conversations")
    assert [len(page) for page in pages] == [2, 2, 1]
    assert [c["id"] for page in pages for c in page] == five


def test_list_pages_hold_when_conversations_share_updated_at(pg_client, five):
    """Conversations active at the very same instant are still paged without duplicates or gaps."""
    with models.db.connection_context():
        models.Conversation.update(updated_at=datetime.datetime(2030, 1, 1, 12, 0, 0)).execute()
    pages = all_pages(lambda **page: listing(pg_client, limit=2, **page), "conversations")
    assert [c["id"] for page in pages for c in page] == five


def test_list_without_limit_has_a_null_cursor_for_a_short_list(pg_client, five):
    """All five fit the default page, so next_cursor is null."""
    body = listing(pg_client)
    assert len(body["conversations"]) == 5 and body["next_cursor"] is None


BAD_LIMITS = ["0", "101", "abc", "-1", "", "1.5", " 2", "²"]


@pytest.mark.parametrize("limit", BAD_LIMITS)
@pytest.mark.parametrize("path", ["/conversations", "/conversations/c0"])
def test_a_limit_outside_1_to_100_is_400(pg_client, five, path, limit):
    """limit must be a whole number from 1 to 100."""
    response = pg_client.get(path, query_string={"limit": limit}, headers=bearer())
    assert_error(response, 400, "invalid_request")


@pytest.mark.parametrize("limit", ["1", "100"])
def test_limits_1_and_100_are_accepted(pg_client, five, limit):
    """The bounds of limit are allowed."""
    assert len(listing(pg_client, limit=limit)["conversations"]) == min(int(limit), 5)


FORGED_LIST_CURSORS = {
    "not-base64": "xyz",
    "base64-of-junk": cursor_of(b"\x00\xffjunk"),
    "base64-of-text": cursor_of(b"hello world"),
    "json-string": cursor_of("c1"),
    "json-number": cursor_of(7),
    "one-element-list": cursor_of(["2030-01-01 00:00:00"]),
    "list-of-numbers": cursor_of([1, 2]),
    "junk-timestamp": cursor_of(["not-a-time", "c1"]),
}


# GET /conversations/<id>

def test_read_gives_the_conversation_and_its_messages_in_order(pg_client, llm):
    """The messages come oldest first, each with role, content, status, time and token counts."""
    llm.script(Script(reply="one back"), Script(reply="two back"))
    run(pg_client, "one", "c1")
    run(pg_client, "two", "c1")
    body = reading(pg_client, "c1")
    assert body["conversation"]["id"] == "c1" and body["conversation"]["message_count"] == 4
    assert all(set(m) == MESSAGE_FIELDS for m in body["messages"])
    assert [(m["role"], m["content"], m["status"]) for m in body["messages"]] == [
        ("user", "one", "complete"), ("assistant", "one back", "complete"),
        ("user", "two", "complete"), ("assistant", "two back", "complete")]
    assert all(ISO_Z.fullmatch(m["created_at"]) for m in body["messages"])
    assert body["next_cursor"] is None


def test_read_gives_token_counts_of_each_message(pg_client, llm):
    """A user message has its token estimate and no prompt_tokens; a reply has both counts."""
    llm.script(Script(reply="four"))
    run(pg_client, "two plus two?", "c1")
    user, reply = reading(pg_client, "c1")["messages"]
    assert (user["token_count"], user["prompt_tokens"]) == (4, None)
    assert (reply["token_count"], reply["prompt_tokens"]) == (1, 3)


def test_read_pages_messages_across_cursors(pg_client, llm):
    """Three turns read with limit=4 come as 4 then 2 messages, in order, with no repeats."""
    for n in range(3):
        run(pg_client, f"m{n}", "c1")
    pages = all_pages(lambda **page: reading(pg_client, "c1", limit=4, **page), "messages")
    assert [len(page) for page in pages] == [4, 2]
    assert [m["content"] for page in pages for m in page] == [
        "m0", "echo: m0", "m1", "echo: m1", "m2", "echo: m2"]


FORGED_MESSAGE_CURSORS = {
    "not-base64": "xyz",
    "base64-of-junk": cursor_of(b"\x00\xffjunk"),
    "json-string": cursor_of("3"),
    "json-bool": cursor_of(True),
    "json-float": cursor_of(1.5),
    "json-list": cursor_of(["a", "b"]),
}


FORGED_CURSORS = {**{f"list-{name}": ("/conversations", cursor) for name, cursor in FORGED_LIST_CURSORS.items()},
                  **{f"read-{name}": ("/conversations/c0", cursor) for name, cursor in FORGED_MESSAGE_CURSORS.items()}}


@pytest.mark.parametrize("path, cursor", FORGED_CURSORS.values(), ids=FORGED_CURSORS.keys())
def test_a_forged_cursor_is_400(pg_client, five, path, cursor):
    """A cursor the service did not hand out, of the list or of a conversation's messages, is invalid_request."""
    response = pg_client.get(path, query_string={"cursor": cursor}, headers=bearer())
    assert_error(response, 400, "invalid_request")


def test_someone_elses_conversation_reads_as_not_found(pg_client, llm):
    """Bob reading alice's conversation gets the very response of an id that does not exist."""
    run(pg_client, "alice's secret", "c1")
    theirs = pg_client.get("/conversations/c1", headers=bearer("bob"))
    missing = pg_client.get("/conversations/no-such-id", headers=bearer("bob"))
    assert_error(theirs, 404, "not_found")
    assert theirs.get_json() == missing.get_json()


# PATCH /conversations/<id>

def test_rename_sets_the_title_that_read_shows(pg_client, llm):
    """PATCH with a title renames the conversation; the reply and later reads show the new title."""
    run(pg_client, "hello", "c1")
    response = pg_client.patch("/conversations/c1", json={"title": "Trip to Oslo"}, headers=bearer())
    assert response.status_code == 200
    assert response.get_json()["conversation"]["title"] == "Trip to Oslo"
    assert reading(pg_client, "c1")["conversation"]["title"] == "Trip to Oslo"
    assert listing(pg_client)["conversations"][0]["title"] == "Trip to Oslo"


def test_a_title_of_200_characters_is_accepted(pg_client, llm):
    """The longest title allowed is kept whole."""
    run(pg_client, "hello", "c1")
    response = pg_client.patch("/conversations/c1", json={"title": "t" * 200}, headers=bearer())
    assert response.status_code == 200
    assert reading(pg_client, "c1")["conversation"]["title"] == "t" * 200


def test_a_renamed_title_survives_later_turns(pg_client, llm):
    """A later turn does not bring the automatic title back."""
    run(pg_client, "hello", "c1")
    pg_client.patch("/conversations/c1", json={"title": "Mine"}, headers=bearer())
    run(pg_client, "another message", "c1")
    assert reading(pg_client, "c1")["conversation"]["title"] == "Mine"


BAD_TITLES = {"empty": {"title": ""}, "whitespace": {"title": "  \t\n "}, "too-long": {"title": "t" * 201},
              "number": {"title": 5}, "null": {"title": None}, "list": {"title": ["a"]}, "missing": {},
              "nul": {"title": "a\x00b"}}


@pytest.mark.parametrize("body", BAD_TITLES.values(), ids=BAD_TITLES.keys())
def test_a_bad_title_is_400_and_the_title_is_unchanged(pg_client, llm, body):
    """An empty, blank, overlong or non-string title is refused and nothing changes."""
    run(pg_client, "hello", "c1")
    response = pg_client.patch("/conversations/c1", json=body, headers=bearer())
    assert_error(response, 400, "invalid_request")
    assert reading(pg_client, "c1")["conversation"]["title"] == "hello"


def test_renaming_someone_elses_conversation_is_404(pg_client, llm):
    """Bob cannot rename alice's conversation, and its title stays."""
    run(pg_client, "hello", "c1")
    response = pg_client.patch("/conversations/c1", json={"title": "bob's now"}, headers=bearer("bob"))
    assert_error(response, 404, "not_found")
    assert reading(pg_client, "c1")["conversation"]["title"] == "hello"


AUTO_TITLES = [("Plan a trip", "Plan a trip"),
               ("  Plan\n\n a \t trip  ", "Plan a trip"),
               ("wordy " * 40, "wordy " * 13 + "wo"),
               ("x" * 300, "x" * 80)]


@pytest.mark.parametrize("message, title", AUTO_TITLES, ids=["short", "whitespace", "many-words", "long"])
def test_the_first_message_becomes_the_title(pg_client, llm, message, title):
    """The automatic title is the first message with whitespace collapsed, at most 80 characters."""
    run(pg_client, message, "c1")
    run(pg_client, "a later message", "c1")
    assert reading(pg_client, "c1")["conversation"]["title"] == title


# DELETE /conversations/<id>

def test_delete_answers_204_with_an_empty_body(pg_client, llm):
    """DELETE of one's own conversation is 204 No Content."""
    run(pg_client, "hello", "c1")
    response = pg_client.delete("/conversations/c1", headers=bearer())
    assert response.status_code == 204
    assert response.get_data() == b""


def test_a_deleted_conversation_reads_as_not_found(pg_client, llm):
    """After DELETE, reading the conversation is 404 and it is no longer listed."""
    run(pg_client, "hello", "c1")
    pg_client.delete("/conversations/c1", headers=bearer())
    assert_error(pg_client.get("/conversations/c1", headers=bearer()), 404, "not_found")
    assert listed_ids(pg_client) == []


def test_delete_removes_the_rows_and_the_cached_copy(pg_client, llm, redis_client):
    """The conversation and its messages leave the database, and its Redis key is gone."""
    run(pg_client, "hello", "c1")
    run(pg_client, "other", "c2")
    assert redis_client.exists(cache_key("c1"))
    pg_client.delete("/conversations/c1", headers=bearer())
    assert "c1" not in message_counts("alice")
    assert not redis_client.exists(cache_key("c1"))
    assert message_counts("alice").get("c2") == 2 and redis_client.exists(cache_key("c2"))


def test_a_turn_after_delete_starts_from_an_empty_history(pg_client, llm):
    """The same id used again sends the model only the new message."""
    run(pg_client, "forget me", "c1")
    pg_client.delete("/conversations/c1", headers=bearer())
    run(pg_client, "new start", "c1")
    assert llm.requests[-1]["json"]["messages"] == [{"role": "user", "content": "new start"}]
    assert [m["content"] for m in reading(pg_client, "c1")["messages"]] == ["new start", "echo: new start"]


def test_deleting_alices_id_as_bob_is_404_and_deletes_nothing_of_hers(pg_client, llm, redis_client):
    """Bob has no conversation of alice's id: his DELETE is 404, and her rows and cache stay."""
    run(pg_client, "hello", "c1")
    response = pg_client.delete("/conversations/c1", headers=bearer("bob"))
    assert_error(response, 404, "not_found")
    assert message_counts("alice").get("c1") == 2
    assert redis_client.exists(cache_key("c1"))


def test_deleting_a_missing_conversation_is_404(pg_client, llm):
    """DELETE of an id that never existed is 404."""
    assert_error(pg_client.delete("/conversations/nothing-here", headers=bearer()), 404, "not_found")


def test_delete_while_a_turn_holds_the_conversation_is_409(pg_client, llm, redis_client):
    """A conversation held by a turn (its Redis turn lock) cannot be deleted meanwhile, and stays."""
    run(pg_client, "hello", "c1")
    redis_client.set(lease_key("c1"), "another-turn", px=60000)
    response = pg_client.delete("/conversations/c1", headers=bearer())
    assert_error(response, 409, "conversation_busy")
    assert message_counts("alice").get("c1") == 2
    assert redis_client.get(lease_key("c1")) == "another-turn"


def test_alices_busy_conversation_does_not_make_bobs_delete_busy(pg_client, llm, redis_client):
    """Alice's lease is on her conversation only: bob's DELETE of the same id is his 404, not 409."""
    run(pg_client, "hello", "c1")
    redis_client.set(lease_key("c1"), "another-turn", px=60000)
    response = pg_client.delete("/conversations/c1", headers=bearer("bob"))
    assert_error(response, 404, "not_found")


# Authentication

ENDPOINTS = [("GET", "/conversations"), ("GET", "/conversations/c1"),
             ("PATCH", "/conversations/c1"), ("DELETE", "/conversations/c1")]


@pytest.mark.parametrize("method, path", ENDPOINTS, ids=[f"{m} {p}" for m, p in ENDPOINTS])
def test_history_endpoints_without_a_token_are_401(pg_client, llm, method, path):
    """Every history endpoint needs a bearer token, and changes nothing without one."""
    run(pg_client, "hello", "c1")
    response = pg_client.open(path, method=method, json={"title": "x"})
    assert_error(response, 401, "unauthorized")
    assert message_counts("alice").get("c1") == 2
    assert reading(pg_client, "c1")["conversation"]["title"] == "hello"


# Over real HTTP (gunicorn + gevent)

def test_list_and_read_work_over_http(service, llm):
    """Through gunicorn, the list is newest first and a conversation reads back in order."""
    for conversation_id in ("h1", "h2"):
        assert service.run(f"hi {conversation_id}", conversation_id).status_code == 200
    listed = service.request("GET", "/conversations").json()
    assert [c["id"] for c in listed["conversations"]] == ["h2", "h1"]
    messages = service.request("GET", "/conversations/h1").json()["messages"]
    assert [m["content"] for m in messages] == ["hi h1", "echo: hi h1"]


def test_someone_elses_conversation_is_404_over_http(service, llm):
    """Through gunicorn, bob gets the same 404 for alice's conversation as for a missing one."""
    assert service.run("alice's", "h1").status_code == 200
    theirs = service.request("GET", "/conversations/h1", user="bob")
    missing = service.request("GET", "/conversations/nope", user="bob")
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json() == missing.json() == {"error": {"code": "not_found",
                                                         "message": "conversation not found"}}


def test_delete_during_an_open_stream_is_409_then_works_after_it(service, llm):
    """While a reply streams the conversation cannot be deleted; once it ends, DELETE is 204."""
    assert service.run("first", "h1").status_code == 200
    with slow_stream(service, llm, "h1") as stream:
        assert_error(service.request("DELETE", "/conversations/h1"), 409, "conversation_busy")
        llm.release()
        assert rest_of(stream)[-1]["is_final"] is True
    assert service.request("DELETE", "/conversations/h1").status_code == 204
    assert "h1" not in message_counts("alice")


def test_streamed_turns_show_in_the_history(service, llm):
    """A streamed turn is read back like any other, with its reply assembled from the chunks."""
    llm.script(Script(chunks=["Hel", "lo"]))
    data_events(service.stream("greet me", "h1"))
    messages = service.request("GET", "/conversations/h1").json()["messages"]
    assert [(m["role"], m["content"], m["status"]) for m in messages] == [
        ("user", "greet me", "complete"), ("assistant", "Hello", "complete")]
