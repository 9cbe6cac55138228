"""The model client against a real OpenAI-compatible HTTP server on loopback."""

import pytest

from errors import ApiError
from llm import DemoModel, OpenAIChatModel
from tests.helpers import MODEL_API_KEY, free_port
from tests.fake_llm import Script

HELLO = [{"role": "user", "content": "hello"}]


def streamed(model, messages=HELLO):
    """The chunks and the final reply of a streamed answer."""
    stream = model.open_stream(messages)
    chunks = list(stream)
    stream.finish()
    return chunks, stream.reply


def test_complete_returns_content_and_usage(model, llm):
    """A non-streamed answer gives its text, model and token counts."""
    llm.script(Script(reply="one two three", model="m-1"))
    reply = model.complete(HELLO)
    assert (reply.content, reply.model, reply.completion_tokens, reply.prompt_tokens) == (
        "one two three", "m-1", 3, 1)


def test_complete_reads_a_gzip_compressed_answer(model, llm):
    """A server that compresses its JSON answer (as proxies in front of models do) is understood."""
    llm.script(Script(reply="squeezed reply", gzip=True))
    assert model.complete(HELLO).content == "squeezed reply"
    assert "gzip" in llm.requests[-1]["headers"]["accept-encoding"]


def test_requests_go_through_the_proxy_the_environment_names(monkeypatch, llm):
    """http_proxy is honoured: the request reaches the proxy (the fake stands in) with the model's absolute URL."""
    proxy = llm.url.rsplit("/v1", 1)[0]
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, proxy)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    model = OpenAIChatModel("http://model.example/v1", None, "fake-model", timeout=1)
    llm.script(Script(reply="via the proxy"))
    assert model.complete(HELLO).content == "via the proxy"
    assert llm.requests[-1]["target"] == "http://model.example/v1/chat/completions"


def test_requests_carry_model_messages_and_key(model, llm):
    """The request names the model, carries the messages and the API key as a bearer token."""
    model.complete(HELLO)
    request = llm.requests[-1]
    assert request["path"] == "/v1/chat/completions"
    assert request["json"]["model"] == "fake-model"
    assert request["json"]["messages"] == HELLO
    assert request["json"]["stream"] is False
    assert request["headers"]["authorization"] == f"Bearer {MODEL_API_KEY}"


def test_stream_yields_chunks_and_usage(model, llm):
    """A streamed answer yields each chunk and ends with the usage the server reported."""
    llm.script(Script(chunks=["a", "b", "c"]))
    chunks, reply = streamed(model)
    assert chunks == ["a", "b", "c"]
    assert (reply.completion_tokens, reply.prompt_tokens, reply.finish_reason) == (3, 1, "stop")


def test_stream_ignores_sse_comments(model, llm):
    """Comment lines the model server sends (keep-alives) are not content."""
    llm.script(Script(chunks=["x", "y"], comments=True))
    assert streamed(model)[0] == ["x", "y"]


def test_stream_reads_a_body_delimited_by_closing(model, llm):
    """A stream without chunked encoding (ended by closing the connection) is read as it comes."""
    llm.script(Script(chunks=["p", "q"], close_delimited=True))
    assert streamed(model)[0] == ["p", "q"]


def test_turns_reuse_one_connection_to_the_model(model, llm):
    """Consecutive turns go over one kept-alive connection."""
    for _ in range(3):
        streamed(model)
        model.complete(HELLO)
    assert len({r["client"] for r in llm.requests}) == 1


@pytest.mark.parametrize("script, code", [
    (Script(status=500), "llm_error"),
    (Script(status=401), "llm_error"),
    (Script(status=404), "llm_error"),
])
def test_error_status_is_a_502(model, llm, script, code):
    """An upstream error status is our 502, whatever it was (an upstream 401 is not the client's)."""
    llm.script(script)
    with pytest.raises(ApiError) as raised:
        model.open_stream(HELLO)
    assert (raised.value.status, raised.value.code) == (502, code)
    assert str(script.status) in raised.value.message


def test_rate_limit_is_a_503_with_retry_after(model, llm):
    """An upstream 429 is our 503, passing Retry-After on."""
    llm.script(Script(status=429, retry_after="12"))
    with pytest.raises(ApiError) as raised:
        model.complete(HELLO)
    assert (raised.value.status, raised.value.code) == (503, "llm_rate_limited")
    assert raised.value.headers == {"Retry-After": "12"}


def test_no_answer_in_time_is_a_504(model, llm):
    """A model that never answers is a 504 after LLM_TIMEOUT_SECONDS."""
    llm.script(Script(hang=True))
    with pytest.raises(ApiError) as raised:
        model.open_stream(HELLO)
    assert (raised.value.status, raised.value.code) == (504, "llm_timeout")


def test_silence_between_chunks_is_a_timeout(model, llm):
    """A model that goes silent mid-stream for longer than the timeout ends the stream with llm_timeout."""
    llm.script(Script(chunks=["a", "b"], silence_after=1))
    stream = model.open_stream(HELLO)
    received = []
    with pytest.raises(ApiError) as raised:
        for chunk in stream:
            received.append(chunk)
    assert received == ["a"]
    assert raised.value.code == "llm_timeout"


def test_unreachable_model_is_a_502(llm):
    """Nobody listening at LLM_BASE_URL is a 502 llm_unavailable."""
    model = OpenAIChatModel(f"http://127.0.0.1:{free_port()}/v1", None, "m", timeout=1)
    with pytest.raises(ApiError) as raised:
        model.complete(HELLO)
    assert (raised.value.status, raised.value.code) == (502, "llm_unavailable")


@pytest.mark.parametrize("script, code", [
    (Script(chunks=["a", "b"], break_after=1), "llm_unavailable"),
    (Script(chunks=["a", "b"], garbage_after=1), "llm_bad_response"),
    (Script(chunks=["a", "b"], no_done=True), "llm_incomplete"),
])
def test_broken_stream_raises_after_the_good_chunks(model, llm, script, code):
    """A stream that breaks, sends garbage or ends without [DONE] raises after what came before."""
    llm.script(script)
    received = []
    with pytest.raises(ApiError) as raised:
        for chunk in model.open_stream(HELLO):
            received.append(chunk)
    assert received == ["a"] if code != "llm_incomplete" else received == ["a", "b"]
    assert raised.value.code == code


def test_describe_never_shows_the_key(model):
    """What /status shows of the model names the backend and model, not the API key."""
    assert MODEL_API_KEY not in repr(model.describe())
    assert model.describe()["model"] == "fake-model"


def test_demo_model_streams_word_by_word():
    """The demo model answers offline, deterministically, one word a chunk."""
    demo = DemoModel(word_delay=0)
    chunks = list(demo.open_stream(HELLO))
    assert len(chunks) > 3 and "".join(chunks) == demo.complete(HELLO).content
    assert "hello" in demo.complete(HELLO).content


def test_describe_hides_credentials_in_the_base_url():
    """A base URL with user:password shows without them."""
    model = OpenAIChatModel("https://user:hunter2@llm.example/v1", None, "m", timeout=1)
    assert model.describe()["base_url"] == "https://llm.example/v1"

