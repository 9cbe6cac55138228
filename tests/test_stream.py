"""POST /chat/stream over real HTTP: gunicorn with the gevent worker, PostgreSQL, Redis, a fake model."""

import json
import re
import threading
import uuid

import requests

import models
from tests.fake_llm import Script
from tests.helpers import (
    POSTGRES_URL,
    assert_error,
    bearer,
    cached_messages,
    complete,
    database_backends,
    lock_waiters,
    locked_table,
    seen_by_model,
    stored_conversation,
    stored_messages,
    wait_until,
)
from tests.sse_client import PING, data_events, events, next_data, rest_of

EVENT_FRAME = re.compile(rb"(id: [0-9a-f]{16}:[0-9]+\ndata: [^\r\n]*\n\n|: ping\n\n)")


def test_stream_sends_each_chunk_then_one_final_event(service, llm):
    """Chunks arrive as non-final events in order; exactly one final event, and it is the last."""
    llm.script(Script(chunks=["Hel", "lo", " world"]))
    received = data_events(service.stream("hello", "c1"))
    assert [e["content"] for e in received[:-1]] == ["Hel", "lo", " world"]
    assert all(e["is_final"] is False and e["metrics"] is None for e in received[:-1])
    assert [e["is_final"] for e in received].count(True) == 1
    assert received[-1]["is_final"] is True and received[-1]["content"] == ""
    assert received[-1]["conversation_id"] == "c1"
    assert "error" not in received[-1]


def test_final_event_carries_metrics(service, llm):
    """The final event reports token counts, timing and the model."""
    llm.script(Script(chunks=["a", "b", "c"], model="served-model"))
    metrics = data_events(service.stream("hello"))[-1]["metrics"]
    assert metrics["token_count"] == metrics["completion_tokens"] == 3
    assert metrics["prompt_tokens"] == 1
    assert metrics["model"] == "served-model"
    assert isinstance(metrics["processing_time"], float)
    assert 0 <= metrics["time_to_first_token"] <= metrics["processing_time"]


def test_stream_headers_stop_caching_and_buffering(service, llm):
    """The stream is text/event-stream, not cached, not buffered by proxies, kept alive."""
    response = requests.post(service.url + "/chat/stream", json={"message": "hello"}, headers=bearer(),
                             stream=True, timeout=(5, 20))
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-cache, no-store"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.headers["Connection"].lower() == "keep-alive"
    response.close()


def test_new_conversation_id_is_in_the_header_and_the_final_event(service, llm):
    """Without a conversation_id the stream starts a new conversation and says its id twice."""
    response = service.stream("hello")
    conversation_id = response.headers["X-Conversation-Id"]
    uuid.UUID(conversation_id)
    assert data_events(response)[-1]["conversation_id"] == conversation_id


def test_every_event_is_an_id_line_one_data_line_and_a_blank_line(service, llm):
    """The body is nothing but `id:` + `data: <json>` events and ping comments, each ended by a blank line."""
    llm.script(Script(chunks=["line one\n\ndata: {\"is_final\": true}\n\n", "\r\nend\u2028\u2029\u0085"]))
    body = service.stream("hello").content
    assert EVENT_FRAME.sub(b"", body) == b""
    assert b"\xe2\x80\xa8" not in body and b"\xe2\x80\xa9" not in body and b"\xc2\x85" not in body
    data_lines = [line for line in body.decode("utf-8").split("\n") if line.startswith("data: ")]
    for line in data_lines:  # a client splitting with str.splitlines() still gets whole JSON
        assert not {"\u2028", "\u2029", "\u0085"} & set(line)
        assert line.splitlines() == [line]
    frames = [json.loads(f.split(b"\ndata: ", 1)[1]) for f in EVENT_FRAME.findall(body) if f.startswith(b"id: ")]
    assert frames[1]["content"] == "\r\nend\u2028\u2029\u0085"
    assert frames[0]["content"] == "line one\n\ndata: {\"is_final\": true}\n\n"
    assert [f["is_final"] for f in frames] == [False, False, True]


def test_first_chunk_reaches_the_client_while_the_model_is_still_talking(service, llm):
    """Nothing buffers the stream: the first chunk arrives before the model sends the next."""
    llm.script(Script(chunks=["first", "second"], chunk_delay=30))
    stream = events(service.stream("hello"))
    first = next_data(stream)
    assert first["content"] == "first"
    assert llm.active_streams == 1
    llm.release()
    assert [e["content"] for e in rest_of(stream)][0] == "second"


def test_heartbeat_pings_while_the_model_is_silent(start_service, llm):
    """A silent model still gives the client a `: ping` every SSE_HEARTBEAT_SECONDS."""
    service = start_service(SSE_HEARTBEAT_SECONDS=0.1)
    llm.script(Script(chunks=["late"], first_chunk_delay=30))
    stream = events(service.stream("hello"))
    assert [next(stream) for _ in range(3)] == [PING, PING, PING]
    llm.release()
    assert [e["content"] for e in rest_of(stream)] == ["late", ""]


def test_stream_saves_both_messages_and_caches_them(service, llm, redis_client):
    """On completion the user message and the reply are in the database and in Redis."""
    llm.script(Script(chunks=["It ", "works."]))
    data_events(service.stream("Does it work?", "c1"))
    assert stored_messages("c1") == complete(("Does it work?", "It works."))
    version, messages = cached_messages(redis_client, "c1")
    assert version == stored_conversation("c1").version
    assert messages[-1] == {"role": "assistant", "content": "It works."}


def test_next_stream_sends_the_history_to_the_model(service, llm):
    """A streamed turn sees the earlier turn of the conversation."""
    llm.script(Script(reply="Hi Bo."), Script(reply="Bo."))
    data_events(service.stream("I am Bo.", "c1"))
    data_events(service.stream("Who am I?", "c1"))
    assert seen_by_model(llm) == ["I am Bo.", "Hi Bo.", "Who am I?"]
    assert llm.requests[-1]["json"]["stream"] is True
    assert llm.requests[-1]["json"]["stream_options"] == {"include_usage": True}


def test_another_users_same_id_streams_a_conversation_of_their_own(service, llm):
    """Mallory naming alice's conversation id gets her own conversation: the model sees none of alice's."""
    data_events(service.stream("mine", "c1", user="alice"))
    assert data_events(service.stream("let me in", "c1", user="mallory"))[-1]["is_final"]
    assert seen_by_model(llm) == ["let me in"]
    assert stored_messages("c1") == complete(("mine", "echo: mine"))
    assert stored_messages("c1", "mallory") == complete(("let me in", "echo: let me in"))


def test_model_error_before_the_stream_is_an_http_error(service, llm):
    """A model that answers 500 gets the client a 502 JSON error, not a 200 event stream."""
    llm.script(Script(status=500))
    response = service.stream("hello", "c1")
    assert_error(response, 502, "llm_error")
    assert stored_messages("c1") == []


def test_history_survives_redis_being_emptied_and_a_restart(start_service, llm, redis_client):
    """On PostgreSQL + Redis the history outlives both the cache and the process."""
    service = start_service()
    llm.script(Script(reply="Noted: 7."))
    data_events(service.stream("My number is 7.", "c1"))
    redis_client.flushdb()  # its own database only: other suites may share the server
    service.stop()
    service = start_service()
    data_events(service.stream("My number?", "c1"))
    assert seen_by_model(llm) == ["My number is 7.", "Noted: 7.", "My number?"]


def test_one_worker_carries_many_streams_at_once(start_service, llm):
    """Fifty streams are open at the model together in a single gevent worker, and all finish."""
    service = start_service(workers=1, MAX_STREAMS_PER_USER=50)
    llm.script(*[Script(chunks=["a", "b"], chunk_delay=30) for _ in range(50)])
    finals = []

    def client(n):
        """Run one streamed turn and keep its final event."""
        finals.append(data_events(service.stream(f"m{n}", f"c{n}"))[-1])

    threads = [threading.Thread(target=client, args=(n,)) for n in range(50)]
    for thread in threads:
        thread.start()
    assert wait_until(lambda: llm.active_streams == 50, timeout=30)
    llm.release()
    for thread in threads:
        thread.join(30)
    assert len(finals) == 50 and not any("error" in f for f in finals)


def test_open_streams_do_not_hold_database_connections(start_service, llm, postgres):
    """Thirty streams waiting on the model share a pool of two connections, and all are saved."""
    postgres.close_all()
    service = start_service(DATABASE_POOL_SIZE=2, MAX_STREAMS_PER_USER=30)
    llm.script(*[Script(chunks=["x"], first_chunk_delay=30) for _ in range(30)])
    results = []
    threads = [threading.Thread(target=lambda n=n: results.append(
        data_events(service.stream("hi", f"p{n}"))[-1])) for n in range(30)]
    for thread in threads:
        thread.start()
    assert wait_until(lambda: llm.active_streams == 30, timeout=30)
    assert database_backends(POSTGRES_URL) <= 2
    llm.release()
    for thread in threads:
        thread.join(30)
    assert len(results) == 30 and not any("error" in r for r in results)
    with models.db.connection_context():
        assert models.Message.select().count() == 60


def test_turns_reuse_one_connection_to_the_model(service, llm):
    """One keep-alive connection to the model carries consecutive streamed and whole turns."""
    for n in range(3):
        data_events(service.stream("hi", f"k{n}"))
        assert wait_until(lambda: llm.active_streams == 0, timeout=10)
        service.run("hi", f"k{n}")
    assert len({r["client"] for r in llm.requests}) == 1


def test_run_over_gunicorn_returns_the_reply(service, llm):
    """/chat/run answers in one JSON reply through the real server."""
    llm.script(Script(reply="pong"))
    response = service.run("ping", "r1")
    assert response.status_code == 200
    assert response.json() == {"response": "pong", "conversation_id": "r1"}
    assert f"openai-compatible at {llm.url}, model fake-model" in service.output()


def test_demo_model_streams_word_by_word_without_a_model_server(start_service):
    """With no LLM_BASE_URL the built-in demo model answers, and /status says so."""
    service = start_service(LLM_BASE_URL="")
    assert service.status()["model"]["backend"] == "demo"
    assert "built-in demo model" in service.output()
    received = data_events(service.stream("hi there"))
    words = [e["content"] for e in received[:-1]]
    assert len(words) > 3 and "".join(words).count(" hi there") == 1
    assert received[-1]["metrics"]["model"] == "demo"


def test_a_bad_token_on_a_stream_is_a_json_401(service, llm):
    """A stream with a bad token gets a JSON 401 and no events."""
    response = requests.post(service.url + "/chat/stream", json={"message": "x"},
                             headers={"Authorization": "Bearer nope"}, timeout=5)
    assert_error(response, 401, "unauthorized")
    assert llm.requests == []


def test_stream_of_another_user_token_works_with_its_own_sub(service, llm):
    """Each user's stream is answered for that user (the token's sub)."""
    data_events(service.stream("hello", "b1", user="bob"))
    assert stored_conversation("b1", "bob").owner == "bob"


def test_a_blocked_query_does_not_stall_the_worker(service, llm, postgres_url):
    """psycopg2 is cooperative: while one turn waits on a locked table, the same worker answers others."""
    blocked = []
    with locked_table(postgres_url, "chat_conversation"):
        waiting = threading.Thread(target=lambda: blocked.append(service.run("hi", "lockd")))
        waiting.start()
        assert wait_until(lambda: lock_waiters(postgres_url) == 1, timeout=10)
        assert service.status()["database"]["state"] == "ok" and blocked == []
    waiting.join(20)
    assert blocked[0].status_code == 200

