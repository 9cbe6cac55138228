"""A conversation's history: kept in the database, cached, and sent back to the model."""

import json

import cache
import models
from redis_link import scope
from tests.helpers import (cache_key, contents, message_rows, run, seen_by_model, sent_to_model,
                           stored_conversation)
from tests.fake_llm import Script


def delete_everything():
    """Delete every conversation and message from the database, behind the app's back."""
    with models.db.connection_context():
        models.Message.delete().execute()
        models.Conversation.delete().execute()


def forget_cache(app):
    """Empty the conversation cache, whatever its backend."""
    conversation_cache = app.extensions["chat"].cache
    with models.db.connection_context():
        conversation_cache.drop([scope(c.owner, c.id) for c in models.Conversation.select()])


def cached(app, conversation_id, owner="alice"):
    """The raw cached copy of the owner's conversation, or None."""
    service = app.extensions["chat"]
    with service.round_trip() as trip:
        copy = service.cache.read(scope(owner, conversation_id), trip)
    return copy.value


def cache_copy(app, conversation_id, raw, owner="alice"):
    """Put a raw copy of the owner's conversation in the cache."""
    service = app.extensions["chat"]
    with service.round_trip() as trip:
        service.cache.write(scope(owner, conversation_id), raw, trip)


def test_run_returns_the_models_reply(client, llm):
    """The reply is what the model said."""
    llm.script(Script(reply="Paris is the capital."))
    assert run(client, "capital of France?", "c1")["response"] == "Paris is the capital."


def test_run_saves_the_user_message_and_the_reply(client, llm):
    """Both messages of a turn are in the database, with roles, status and token counts."""
    llm.script(Script(reply="four"))
    run(client, "two plus two?", "c1")
    user, reply = message_rows("c1")
    assert (user["role"], user["content"]) == ("user", "two plus two?")
    assert (reply["role"], reply["content"], reply["status"]) == ("assistant", "four", "complete")
    assert reply["token_count"] == 1 and reply["prompt_tokens"] == 3
    assert user["token_count"] >= 1


def test_first_turn_records_owner_and_title(client, llm):
    """A new conversation belongs to its first user and is titled after the first message."""
    run(client, "  Plan   the\nteam offsite  ", "c1", user="carol")
    conversation = stored_conversation("c1", "carol")
    assert conversation.owner == "carol"
    assert conversation.title == "Plan the team offsite"


def test_next_turn_sends_the_history_to_the_model(client, llm):
    """The model sees the earlier turns of the conversation, oldest first, then the new message."""
    llm.script(Script(reply="Hello Ann."), Script(reply="Your name is Ann."))
    run(client, "I am Ann.", "c1")
    run(client, "What is my name?", "c1")
    assert sent_to_model(llm) == [
        {"role": "user", "content": "I am Ann."},
        {"role": "assistant", "content": "Hello Ann."},
        {"role": "user", "content": "What is my name?"},
    ]


def test_conversations_do_not_share_history(client, llm):
    """A turn in one conversation does not see another conversation's messages."""
    run(client, "secret in c1", "c1")
    run(client, "hello c2", "c2")
    assert sent_to_model(llm) == [{"role": "user", "content": "hello c2"}]


def test_history_sent_is_limited_to_the_last_messages(make_app, backend, llm):
    """Only the last CHAT_HISTORY_LIMIT messages go to the model."""
    client = make_app(CHAT_HISTORY_LIMIT=4, **backend).test_client()
    for n in range(3):
        llm.script(Script(reply=f"reply {n}"))
        run(client, f"message {n}", "c1")
    run(client, "message 3", "c1")
    assert seen_by_model(llm) == [
        "message 1", "reply 1", "message 2", "reply 2", "message 3"]


def test_system_prompt_goes_first(make_app, backend, llm):
    """LLM_SYSTEM_PROMPT is the first message of every request."""
    client = make_app(LLM_SYSTEM_PROMPT="Answer in French.", **backend).test_client()
    run(client, "hello", "c1")
    run(client, "again", "c1")
    assert sent_to_model(llm)[0] == {"role": "system", "content": "Answer in French."}
    assert [m["role"] for m in sent_to_model(llm)] == ["system", "user", "assistant", "user"]


def test_history_survives_losing_the_cache(app, llm):
    """On a cache miss the history is loaded from the database: no context is lost."""
    client = app.test_client()
    llm.script(Script(reply="Noted: blue."))
    run(client, "My colour is blue.", "c1")
    forget_cache(app)
    run(client, "What is my colour?", "c1")
    assert seen_by_model(llm) == [
        "My colour is blue.", "Noted: blue.", "What is my colour?"]


def test_history_survives_a_new_app_instance(make_app, backend, llm):
    """A restarted service (a new app on the same database) still has the history."""
    run(make_app(**backend).test_client(), "remember 42", "c1")
    run(make_app(empty=False, **backend).test_client(), "what number?", "c1")
    assert sent_to_model(llm)[0]["content"] == "remember 42"


def test_redis_cache_holds_recent_messages_with_a_ttl(make_pg_app, redis_client, llm):
    """After a turn Redis holds the version and the last messages, expiring after CACHE_TTL_SECONDS."""
    app = make_pg_app(CACHE_TTL_SECONDS=120, CHAT_HISTORY_LIMIT=2)
    client = app.test_client()
    llm.script(Script(reply="one"), Script(reply="two"))
    run(client, "first", "c1")
    run(client, "second", "c1")
    key = cache_key("c1")
    cached = json.loads(redis_client.get(key))
    version = stored_conversation("c1").version
    assert cached == {"version": version, "messages": [
        {"role": "user", "content": "second"}, {"role": "assistant", "content": "two"}]}
    assert 0 < redis_client.ttl(key) <= 120


def test_a_cached_copy_of_the_current_version_is_used(app, llm):
    """When the cache holds the database's version, the turn takes its messages from the cache."""
    client = app.test_client()
    run(client, "hello", "c1")
    version = stored_conversation("c1").version
    cache_copy(app, "c1", cache.encode(version, [{"role": "user", "content": "from cache"}]))
    run(client, "again", "c1")
    assert seen_by_model(llm) == ["from cache", "again"]


def test_a_stale_cached_copy_never_wins_over_the_database(app, llm):
    """A cached copy of an older version (a write it missed) is ignored: the model sees the database's history."""
    client = app.test_client()
    llm.script(Script(reply="r1"), Script(reply="r2"))
    run(client, "m1", "c1")
    stale = cached(app, "c1")
    run(client, "m2", "c1")
    cache_copy(app, "c1", stale)
    run(client, "m3", "c1")
    assert seen_by_model(llm) == ["m1", "r1", "m2", "r2", "m3"]


def test_a_cached_copy_of_a_deleted_conversation_is_ignored(app, llm):
    """A conversation gone from the database starts empty, whatever the cache still holds."""
    client = app.test_client()
    run(client, "secret", "c1")
    delete_everything()
    run(client, "fresh start", "c1")
    assert seen_by_model(llm) == ["fresh start"]


def test_database_has_the_indexes_the_queries_need(postgres):
    """Messages are indexed by conversation and order; conversations by owner and activity."""
    with postgres.connection_context():
        message_indexes = {tuple(i.columns) for i in postgres.get_indexes("chat_message")}
        conversation_indexes = {(tuple(i.columns), i.unique) for i in postgres.get_indexes("chat_conversation")}
    assert ("conversation_key", "id") in message_indexes
    assert (("owner", "updated_at"), False) in conversation_indexes
    assert (("owner", "id"), True) in conversation_indexes  # ids are per user, and unique for each


def test_a_cached_copy_from_before_a_delete_is_not_reused(app, llm):
    """A conversation deleted and started again never matches a copy cached before the delete."""
    client = app.test_client()
    run(client, "old life", "c1")
    old_copy = cached(app, "c1")
    delete_everything()
    run(client, "new life", "c1")
    cache_copy(app, "c1", old_copy)
    run(client, "which life?", "c1")
    assert seen_by_model(llm) == ["new life", "echo: new life", "which life?"]


def test_a_turn_saved_under_another_owner_goes_to_that_owners_conversation(client, llm):
    """Saving bob's turn with alice's conversation id creates bob's conversation and leaves alice's whole."""
    run(client, "mine", "c1", user="alice")
    with models.db.connection_context():
        assert models.save_turn(conversation_id="c1", owner="bob", message="also mine?", reply="no",
                                status="complete")
    assert contents(message_rows("c1")) == ["mine", "echo: mine"]
    assert contents(message_rows("c1", "bob")) == ["also mine?", "no"]
