"""Every model server as it really behaves: byte-exact streams in the shapes real servers send, errors
inside a stream, a context the model calls too long; the client on its own and the service under gunicorn."""

import json

import pytest
import requests

from errors import ApiError
from errors import ContextTooLarge
from llm import EventDecoder
from tests.fake_llm import Script
from tests.helpers import bearer, complete, seen_by_model, stored_messages, wait_until
from tests.sse_client import PING, data_events, events

HELLO = [{"role": "user", "content": "hello"}]


def chunk(content=None, finish_reason=None, **extra):
    """One chat.completion.chunk, as JSON text."""
    delta = {} if content is None else {"content": content}
    return json.dumps({"object": "chat.completion.chunk", "model": "real-model",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra})


def sse(*payloads, end=b"\n"):
    """`data:` events of `payloads`, each line ended by `end`."""
    return b"".join(b"data: " + p.encode() + end + end for p in payloads)


GOOD = [chunk("Hel"), chunk("lo"), chunk(None, "stop")]

# (name, the bytes a server sends, split where the network may split them) for streams that must read "Hello"
READABLE = [
    ("lf", [sse(*GOOD, "[DONE]")]),
    ("crlf (Azure, LiteLLM behind some proxies)", [sse(*GOOD, "[DONE]", end=b"\r\n")]),
    ("cr only", [sse(*GOOD, "[DONE]", end=b"\r")]),
    ("crlf split between its cr and lf", [sse(*GOOD, "[DONE]", end=b"\r\n")[:len(sse(GOOD[0], end=b"\r\n")) - 1],
                                          sse(*GOOD, "[DONE]", end=b"\r\n")[len(sse(GOOD[0], end=b"\r\n")) - 1:]]),
    ("byte-order mark before the first line", [b"\xef\xbb\xbf" + sse(*GOOD, "[DONE]")]),
    ("byte-order mark split across reads", [b"\xef\xbb", b"\xbf" + sse(*GOOD, "[DONE]")]),
    ("[DONE] with trailing whitespace", [sse(*GOOD) + b"data: [DONE] \n\n"]),
    ("no space after the colon (llama.cpp)", [b"".join(b"data:" + p.encode() + b"\n\n" for p in GOOD)
                                              + b"data:[DONE]\n\n"]),
    ("comments and keep-alives (OpenRouter, llama-cpp-python)",
     [b": OPENROUTER PROCESSING\n\n" + sse(GOOD[0]) + b": ping - 2026-12-02 17:20:51\n\n" + sse(*GOOD[1:], "[DONE]")]),
    ("event and id fields around the data (vLLM behind a gateway)",
     [b"event: message\nid: 1\n" + sse(GOOD[0]) + b"retry: 1000\n" + sse(*GOOD[1:], "[DONE]")]),
    ("one byte per read", [bytes([b]) for b in sse(*GOOD, "[DONE]")]),
    ("a usage chunk with empty choices (OpenAI, vLLM)",
     [sse(*GOOD, json.dumps({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}), "[DONE]")]),
    ("a role chunk first (llama-cpp-python)", [sse(json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant"},
                                                                               "finish_reason": None}]}),
                                                    *GOOD, "[DONE]")]),
]

# (name, bytes) of streams in which the server reports an error
REPORTED_ERRORS = [
    ("vLLM: an error object, then [DONE]",
     sse(GOOD[0], json.dumps({"error": {"message": "Engine loop has died", "type": "InternalServerError",
                                        "code": 500}}), "[DONE]")),
    ("OpenRouter: an error object with finish_reason error",
     sse(GOOD[0], json.dumps({"error": {"code": 502, "message": "Provider returned error"},
                              "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]}))),
    ("an event named error", sse(GOOD[0]) + b"event: error\ndata: {\"message\": \"overloaded\"}\n\n"),
    ("llama.cpp: an error field line", sse(GOOD[0]) + b"error: {\"code\": 500, \"message\": \"slot unavailable\"}\n\n"),
]


def streamed_text(model, messages=HELLO):
    """The text of a streamed answer, and its reply figures."""
    stream = model.open_stream(messages)
    text = "".join(stream)
    stream.finish()
    return text, stream.reply


@pytest.mark.parametrize("pieces", [p for _, p in READABLE], ids=[n for n, _ in READABLE])
def test_the_client_reads_every_real_servers_stream_shape(model, llm, pieces):
    """Whatever the line endings, byte-order mark, comments, fields or splits, the reply is read whole."""
    llm.script(Script(raw=pieces))
    text, reply = streamed_text(model)
    assert text == "Hello" and reply.finish_reason == "stop"


@pytest.mark.parametrize("raw", [r for _, r in REPORTED_ERRORS], ids=[n for n, _ in REPORTED_ERRORS])
def test_an_error_the_server_reports_in_its_stream_ends_it_with_our_own_message(model, llm, raw):
    """An error inside the stream is an llm_error whose message is ours, never the upstream's."""
    llm.script(Script(raw=[raw]))
    stream = model.open_stream(HELLO)
    received = []
    with pytest.raises(ApiError) as failure:
        for text in stream:
            received.append(text)
    assert received == ["Hel"]
    assert failure.value.code == "llm_error"
    for upstream_words in ("Engine loop", "Provider returned", "overloaded", "slot unavailable"):
        assert upstream_words not in failure.value.message


def test_a_whole_answer_holding_an_error_object_is_a_502(model, llm):
    """A non-streamed 200 whose body is an error object is an llm_error, not an empty reply."""
    llm.script(Script(raw=[json.dumps({"error": {"message": "Engine loop has died"}}).encode()]))
    with pytest.raises(ApiError) as failure:
        model.complete(HELLO)
    assert (failure.value.status, failure.value.code) == (502, "llm_error")


CONTEXT_ERRORS = [
    ("openai", 400, json.dumps({"error": {"message": "This model's maximum context length is 8192 tokens. However, "
                                                     "your messages resulted in 9000 tokens.",
                                          "type": "invalid_request_error", "code": "context_length_exceeded"}})),
    ("vllm", 400, json.dumps({"object": "error", "message": "This model's maximum context length is 2048 tokens. "
                              "However, you requested 2100 tokens (2100 in the messages, None in the completion).",
                              "type": "BadRequestError", "code": 400})),
    ("llama.cpp", 400, json.dumps({"error": {"code": 400, "message": "the request exceeds the available context "
                                             "size, try increasing it", "type": "exceed_context_size_error"}})),
    ("litellm", 400, json.dumps({"error": {"message": "litellm.ContextWindowExceededError: prompt is too long",
                                           "type": None, "param": None, "code": "400"}})),
]


@pytest.mark.parametrize("status,body", [(s, b) for _, s, b in CONTEXT_ERRORS], ids=[n for n, _, _ in CONTEXT_ERRORS])
def test_each_servers_way_of_saying_the_context_is_too_long_is_recognised(model, llm, status, body):
    """OpenAI's code and the wording of vLLM, llama.cpp and LiteLLM all mean: too long."""
    llm.script(Script(status=status, error_message=body))
    with pytest.raises(ContextTooLarge):
        model.complete(HELLO)


def test_a_plain_bad_request_is_not_taken_for_a_context_overflow(model, llm):
    """A 400 about something else stays a 502 llm_error."""
    llm.script(Script(status=400, error_message="Invalid value for 'temperature'"))
    with pytest.raises(ApiError) as failure:
        model.complete(HELLO)
    assert failure.value.code == "llm_error"


def test_the_decoder_dispatches_only_at_a_blank_line():
    """An event without its blank line at the end of the body is not an event (the WHATWG rule)."""
    decoder = EventDecoder()
    assert decoder.feed(b"data: one\n\ndata: two\n") == [("data", "one")]
    assert decoder.feed(b"\n") == [("data", "two")]


# The service under gunicorn

@pytest.mark.parametrize("raw", [r for _, r in REPORTED_ERRORS], ids=[n for n, _ in REPORTED_ERRORS])
def test_an_error_reported_mid_stream_ends_the_turn_with_llm_error_and_keeps_it_as_error(service, llm, raw):
    """The final event carries llm_error (our message); the partial reply is saved with status error."""
    llm.script(Script(raw=[raw]))
    with service.stream("hi", "c1") as response:
        received = data_events(response)
    assert [e["content"] for e in received[:-1]] == ["Hel"]
    assert received[-1]["error"]["code"] == "llm_error"
    assert received[-1]["finish_reason"] == "error"
    assert stored_messages("c1") == [("user", "hi", "complete"), ("assistant", "Hel", "error")]


def history_of(service, turns):
    """Fill conversation c1 with `turns` finished turns of a hundred words each."""
    for n in range(turns):
        assert service.run(f"turn {n} " + "word " * 100, "c1").status_code == 200


def test_when_the_model_says_the_context_is_too_long_the_oldest_turns_are_left_out(start_service, llm):
    """The model refuses with context_length_exceeded twice; the third try, with two turns fewer, answers,
    and the final event says how many history messages were sent."""
    service = start_service(STREAM_RESUME_GRACE_SECONDS=0)
    history_of(service, 3)
    too_long = Script(status=400, error_message=CONTEXT_ERRORS[0][2])
    llm.script(too_long, too_long, Script(chunks=["fits ", "now"]))
    with service.stream("the new one", "c1") as response:
        final = data_events(response)[-1]
    assert "error" not in final and final["metrics"]["history_messages"] == 2
    sent = [len(request["json"]["messages"]) for request in llm.requests[-3:]]
    assert sent == [7, 5, 3]
    assert seen_by_model(llm)[-1] == "the new one"


def test_a_message_that_alone_is_too_long_for_the_model_is_413(service, llm):
    """Down to the new message alone and still too long: 413 context_too_large, nothing saved."""
    history_of(service, 1)
    too_long = Script(status=400, error_message=CONTEXT_ERRORS[2][2])
    llm.script(too_long, too_long)
    response = service.run("far too long", "c1")
    assert response.status_code == 413 and response.json()["error"]["code"] == "context_too_large"
    assert len(stored_messages("c1")) == 2


def test_an_empty_stream_that_did_not_fit_is_asked_again_with_less_history(service, llm):
    """llama-cpp-python answers 200 and sends nothing when the prompt is too long: the service asks, with one
    token, whether it fits, leaves the oldest turn out, and streams again."""
    history_of(service, 2)
    too_long = Script(status=400, error_message=CONTEXT_ERRORS[0][2])
    llm.script(Script(raw=[b""]), too_long, Script(chunks=["short ", "enough"]))
    with service.stream("the new one", "c1") as response:
        received = data_events(response)
    assert "".join(e["content"] for e in received) == "short enough"
    assert received[-1]["metrics"]["history_messages"] == 2
    probe = llm.requests[-2]["json"]
    assert probe["max_tokens"] == 1 and probe["stream"] is False and len(probe["messages"]) == 5


def test_an_empty_stream_that_fits_is_an_error_not_a_retry(service, llm):
    """An empty stream whose prompt does fit is a failure of the model: llm_incomplete, no second stream."""
    llm.script(Script(raw=[b""]), Script(reply="x"))
    with service.stream("hi", "c1") as response:
        final = data_events(response)[-1]
    assert final["error"]["code"] == "llm_incomplete"
    assert len(llm.requests) == 2  # the stream and the one-token question


# What a new user hit

def test_an_oversized_chunked_body_is_413_too_large(start_service):
    """A body over MAX_CONTENT_LENGTH sent with Transfer-Encoding: chunked is 413, as with a Content-Length."""
    service = start_service(MAX_CONTENT_LENGTH=1000)

    def body():
        """The JSON body in pieces, so requests sends it chunked."""
        yield b'{"message": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'", "conversation_id": "c1"}'

    response = requests.post(service.url + "/chat/run", data=body(), timeout=10,
                             headers={**bearer(), "Content-Type": "application/json", "Connection": "close"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"


def test_delete_during_a_new_conversations_first_turn_is_409_and_the_turn_is_kept(service, llm):
    """The first turn holds the conversation: DELETE is 409 conversation_busy, not 404, and the turn is saved."""
    llm.script(Script(chunks=["slow ", "first"], chunk_delay=1))
    with service.stream("first words", "brand-new") as response:
        assert wait_until(lambda: llm.requests, timeout=10)
        deleted = requests.delete(service.url + "/conversations/brand-new", headers=bearer(), timeout=10)
        assert deleted.status_code == 409 and deleted.json()["error"]["code"] == "conversation_busy"
        data_events(response)
    assert stored_messages("brand-new") == complete(("first words", "slow first"))


def test_the_demo_model_counts_the_words_it_sent_when_stopped(start_service):
    """A demo reply stopped after a few words reports those words, not the whole reply."""
    service = start_service(LLM_BASE_URL="", STREAM_RESUME_GRACE_SECONDS=0)
    with service.stream("please tell me everything you know about stopping early", "d1") as response:
        received = []
        for event in data_events_until(response, 3, lambda: service.post("/chat/stop", {"conversation_id": "d1"})):
            received.append(event)
    final = received[-1]
    sent = [e for e in received[:-1] if e["content"]]
    assert final["finish_reason"] == "stopped"
    assert final["metrics"]["token_count"] == len(sent) < 20


def data_events_until(response, count, then):
    """The stream's data events; after the first `count`, call `then()` once."""
    seen = 0
    for event in events(response):
        if event == PING:
            continue
        seen += 1
        if seen == count:
            then()
        yield event
