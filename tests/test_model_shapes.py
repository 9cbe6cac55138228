"""Every model server as it really behaves: byte-exact streams in the shapes real servers send, errors
inside a stream, a context the model calls too long; the client on its own and the service under gunicorn."""

import json

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from errors import ApiError
from errors import ContextTooLarge
from llm import MAX_LINE_BYTES, MAX_STREAM_BYTES, EventDecoder
from tests.fake_llm import Script
from tests.helpers import assert_error, bearer, complete, seen_by_model, stored_messages, wait_until
from tests.sse_client import PING, data_events, data_events_in, events, next_data, rest_of

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
    ("an event named error without data", sse(GOOD[0]) + b"event: error\n\n"),
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


# (name, the JSON body of a 200) of whole answers in which the server reports an error
WHOLE_ANSWER_ERRORS = [
    ("an error object", {"error": {"message": "Engine loop has died", "type": "InternalServerError"}}),
    ("vLLM: a top-level error object", {"object": "error", "message": "Engine loop has died",
                                        "type": "InternalServerError", "code": 500}),
    ("a choice with finish_reason error", {"object": "chat.completion", "model": "real-model",
                                           "choices": [{"index": 0, "finish_reason": "error",
                                                        "message": {"role": "assistant", "content": "Engine loop"}}]}),
]


@pytest.mark.parametrize("answer", [a for _, a in WHOLE_ANSWER_ERRORS], ids=[n for n, _ in WHOLE_ANSWER_ERRORS])
def test_a_whole_answer_reporting_an_error_is_a_502_llm_error_for_chat_run(pg_client, llm, answer):
    """/chat/run on a 200 whose body reports an error: 502 llm_error with our own message, nothing kept."""
    llm.script(Script(raw=[json.dumps(answer).encode()]))
    response = pg_client.post("/chat/run", json={"message": "hi", "conversation_id": "c1"}, headers=bearer())
    assert_error(response, 502, "llm_error")
    assert "Engine loop" not in response.get_data(as_text=True)
    assert stored_messages("c1") == []


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


# (name, status, upstream text, our code) of refusals that are not a context overflow
NOT_CONTEXT_ERRORS = [
    ("a plain bad request", 400, "Invalid value for 'temperature'", "llm_error"),
    ("vllm: max_tokens too large", 400,
     json.dumps({"object": "error", "message": "'max_tokens' or 'max_completion_tokens' is too large: 5000. This "
                 "model's maximum context length is 2048 tokens and your request has 100 input tokens "
                 "(5000 > 2048 - 100).", "type": "BadRequestError", "code": 400}), "llm_error"),
    ("max_tokens must be less than the context length", 400,
     "max_tokens must be less than the context length of 2048 tokens", "llm_error"),
    ("a rate limit on tokens", 429, "Rate limit reached: too many tokens per minute", "llm_rate_limited"),
]


@pytest.mark.parametrize("status,body,code", [(s, b, c) for _, s, b, c in NOT_CONTEXT_ERRORS],
                         ids=[n for n, _, _, _ in NOT_CONTEXT_ERRORS])
def test_a_refusal_about_something_else_is_not_taken_for_a_context_overflow(model, llm, status, body, code):
    """A 4xx about another setting (max_tokens) or a rate of tokens is not retried with less history."""
    llm.script(Script(status=status, error_message=body))
    with pytest.raises(ApiError) as failure:
        model.complete(HELLO)
    assert not isinstance(failure.value, ContextTooLarge)
    assert failure.value.code == code


def test_a_complaint_about_max_tokens_names_the_setting(model, llm):
    """The model refusing max_tokens: our message points at LLM_MAX_TOKENS."""
    llm.script(Script(status=400, error_message=NOT_CONTEXT_ERRORS[1][2]))
    with pytest.raises(ApiError) as failure:
        model.complete(HELLO)
    assert failure.value.message == "the model answered HTTP 400 (check LLM_MAX_TOKENS)"


def test_the_decoder_dispatches_only_at_a_blank_line():
    """An event without its blank line at the end of the body is not an event (the WHATWG rule)."""
    decoder = EventDecoder()
    assert decoder.feed(b"data: one\n\ndata: two\n") == [("data", "one")]
    assert decoder.feed(b"\n") == [("data", "two")]


def test_the_decoder_dispatches_a_cr_only_event_at_its_last_cr():
    """A CR ends its line at once: the event is not held back until the next block comes."""
    decoder = EventDecoder()
    assert decoder.feed(b"data: a\r\r") == [("data", "a")]
    assert decoder.feed(b"data: b\r\n\r") == [("data", "b")]


def test_an_lf_after_a_cr_that_ended_the_last_block_is_half_of_a_crlf():
    """CR at the end of one block, LF at the start of the next: one line end, not a blank line between."""
    decoder = EventDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\ndata: b\r\n") == []
    assert decoder.feed(b"\r\n") == [("data", "a\nb")]


# Events as servers write them: most one `data: ` line ended by LF LF; others of any lines (data, also
# without its space or empty; an event name; llama.cpp's error field; a comment), each ended by LF, CR
# or CRLF, then a blank line; the body may end in the middle of one.
SSE_VALUES = st.sampled_from([b"", b"x", b'{"a": 1}', "\u00e9t\u00e9".encode(), b"[DONE]"])
SSE_ENDS = st.sampled_from([b"\n", b"\r", b"\r\n"])
SSE_LINE = st.builds(lambda field, value, end: field + (value if field.endswith(b":") or field.endswith(b" ") else b"")
                     + end,
                     st.sampled_from([b"data: ", b"data:", b"data:  ", b"event: error", b"event: message",
                                      b"error: ", b": ping"]), SSE_VALUES, SSE_ENDS)
SSE_EVENT = st.one_of(st.builds(lambda value: b"data: " + value + b"\n\n", SSE_VALUES),
                      st.builds(lambda lines, end: b"".join(lines) + end, st.lists(SSE_LINE, max_size=4), SSE_ENDS))


@given(st.lists(SSE_EVENT, max_size=12), st.lists(SSE_LINE, max_size=2),
       st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_the_decoder_reads_events_the_same_however_the_bytes_are_split(whole, unfinished, cuts):
    """Each event in a block of its own (a whole `data: ` event is read at once), or the same bytes cut
    anywhere, down to one byte at a time: the same events."""
    blocks = whole + unfinished
    body = b"".join(blocks)
    one_byte_at_a_time = decoded([body[n:n + 1] for n in range(len(body))])
    assert decoded(blocks) == one_byte_at_a_time
    points = sorted({min(cut, len(body)) for cut in cuts} | {0, len(body)})
    assert decoded([body[a:b] for a, b in zip(points, points[1:])]) == one_byte_at_a_time


def test_whole_data_events_are_read_as_any_other():
    """Blocks of one `data: ` event each: their text, counted, and what a block holds beyond one event is not lost."""
    decoder = EventDecoder()
    assert decoder.feed(b"data: one\n\n") == [("data", "one")]
    assert decoder.feed(b"data: two\n\ndata: three\n\n") == [("data", "two"), ("data", "three")]
    assert decoder.feed(b"data: f\xc3\xbcr\n\n") == [("data", "f\u00fcr")]
    assert decoder.feed(b"data: four\r\n\r\n") == [("data", "four")]
    assert decoder.feed(b"data: half") == []
    assert decoder.feed(b"data: rest\n\n") == [("data", "halfdata: rest")]
    assert decoder.events == 6


def decoded(blocks):
    """The events an EventDecoder reads from `blocks`, in order."""
    decoder = EventDecoder()
    return [event for block in blocks for event in decoder.feed(block)]


def test_the_data_of_one_event_is_bounded():
    """`data:` lines that never reach a blank line are refused past MAX_LINE_BYTES in all, not kept."""
    decoder = EventDecoder()
    line = b"data: " + b"x" * (1024 * 1024) + b"\n"
    with pytest.raises(ApiError) as failure:
        for _ in range(MAX_LINE_BYTES // (1024 * 1024) + 1):
            decoder.feed(line)
    assert failure.value.code == "llm_bad_response"


CR_ONLY = [sse(GOOD[0], end=b"\r"), sse(GOOD[1], end=b"\r"), sse(GOOD[2], "[DONE]", end=b"\r")]


def test_each_cr_only_event_is_read_before_the_next_arrives(model, llm):
    """CR-only endings, each event in its own read: each chunk is yielded while the server holds the next."""
    llm.script(Script(raw=CR_ONLY, raw_gated=True))
    stream = model.open_stream(HELLO)
    chunks = iter(stream)
    assert next(chunks) == "Hel"
    llm.release()
    assert next(chunks) == "lo"
    llm.release()
    assert list(chunks) == []
    assert stream.reply.finish_reason == "stop"


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


def test_each_cr_only_event_reaches_the_client_before_the_model_sends_the_next(service, llm):
    """Through the service: each chunk of a CR-only stream is relayed while the model holds back the next."""
    llm.script(Script(raw=CR_ONLY, raw_gated=True))
    with service.stream("hi", "c1") as response:
        received = events(response)
        assert next_data(received)["content"] == "Hel"
        llm.release()
        assert next_data(received)["content"] == "lo"
        llm.release()
        final = rest_of(received)[-1]
    assert "error" not in final and final["finish_reason"] == "stop"
    assert stored_messages("c1") == complete(("hi", "Hello"))


MEBIBYTE = 1024 * 1024
TOO_MUCH = [
    ("data lines that never end their event",
     [sse(GOOD[0])] + [b"data: " + b"x" * MEBIBYTE + b"\n"] * (MAX_LINE_BYTES // MEBIBYTE + 1)),
    ("a stream longer than MAX_STREAM_BYTES (comments)",
     [sse(GOOD[0])] + [b": " + b"x" * (MAX_LINE_BYTES - 16) + b"\n"] * (MAX_STREAM_BYTES // MAX_LINE_BYTES + 1)
     + [sse(*GOOD[1:], "[DONE]")]),
]


@pytest.mark.parametrize("pieces", [p for _, p in TOO_MUCH], ids=[n for n, _ in TOO_MUCH])
def test_a_stream_past_its_bounds_ends_the_turn_with_llm_bad_response(service, llm, pieces):
    """Past one event's bound or the whole stream's, the turn ends with llm_bad_response; the partial reply
    is kept as an error."""
    llm.script(Script(raw=pieces))
    with service.stream("hi", "c1") as response:
        received = data_events(response)
    assert [e["content"] for e in received[:-1]] == ["Hel"]
    assert received[-1]["error"]["code"] == "llm_bad_response"
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


CONTEXT_ERROR_TEXT = json.loads(CONTEXT_ERRORS[2][2])["error"]
# (name, a 200 answer saying the context is too long) as servers say it inside a stream or a whole answer
OVERFLOWS_IN_A_200 = [
    ("llama.cpp: an error line in the stream", "stream", b"error: " + json.dumps(CONTEXT_ERROR_TEXT).encode() + b"\n\n"),
    ("vLLM: an error object in the stream", "stream", sse(CONTEXT_ERRORS[0][2], "[DONE]")),
    ("an error object in a whole answer", "run", json.dumps({"error": CONTEXT_ERROR_TEXT}).encode()),
    ("vLLM: a top-level error in a whole answer", "run", CONTEXT_ERRORS[1][2].encode()),
]


@pytest.mark.parametrize("path,raw", [(p, r) for _, p, r in OVERFLOWS_IN_A_200], ids=[n for n, _, _ in OVERFLOWS_IN_A_200])
def test_a_context_overflow_reported_in_a_200_leaves_the_oldest_turns_out(service, llm, path, raw):
    """Said inside a 200 before any text, the overflow is handled as the HTTP 400 one: asked again with the
    oldest turn left out, and answered."""
    history_of(service, 2)
    llm.script(Script(raw=[raw]), Script(chunks=["fits ", "now"]))
    response = service.turn(path, "the new one", "c1")
    assert response.status_code == 200, response.text
    if path == "stream":
        final = [e for e in data_events_in(response.text) if e.get("is_final")][-1]
        assert "error" not in final and final["metrics"]["history_messages"] == 2
    else:
        assert response.json()["response"] == "fits now"
    assert [len(request["json"]["messages"]) for request in llm.requests[-2:]] == [5, 3]
    assert stored_messages("c1")[-2:] == complete(("the new one", "fits now"))


@pytest.mark.parametrize("path,raw", [(p, r) for _, p, r in OVERFLOWS_IN_A_200], ids=[n for n, _, _ in OVERFLOWS_IN_A_200])
def test_a_message_the_model_says_alone_is_too_long_in_a_200_is_context_too_large(service, llm, path, raw):
    """Down to the message alone and still too long: 413 for a run (nothing kept), a final event with
    context_too_large for a stream (its reply kept as an error)."""
    history_of(service, 1)
    llm.script(Script(raw=[raw]), Script(raw=[raw]))
    response = service.turn(path, "far too long", "c1")
    if path == "run":
        assert response.status_code == 413 and response.json()["error"]["code"] == "context_too_large"
        assert len(stored_messages("c1")) == 2
    else:
        assert data_events_in(response.text)[-1]["error"]["code"] == "context_too_large"
        assert stored_messages("c1")[2:] == [("user", "far too long", "complete"), ("assistant", "", "error")]
    assert [len(request["json"]["messages"]) for request in llm.requests[-2:]] == [3, 1]


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
