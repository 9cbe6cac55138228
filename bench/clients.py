"""What each HTTP client costs to reach a streamed reply's first chunk, side by side.

From the repository root, with the project's virtualenv:

    .venv/bin/python bench/clients.py [--n 2000]

It starts the fake model (tests/fake_llm.py, gevent) on loopback and, in this one gevent
process (patched as a gunicorn gevent worker is), sends the same streamed chat request
through each client in turn, round after round, and prints the p50 and p95 time to the
first content chunk of each:

- ``raw socket``: bench/loadgen.py's hand-read HTTP/1.1 connection (the benchmark's "direct");
- ``http.client``: the standard library's connection, kept alive;
- ``urllib3``: a connection pool, as requests uses it underneath;
- ``service``: the service's own client (llm.OpenAIChatModel: requests' session and adapter).

The differences are what the choice of client adds to the time to first token.
"""

from gevent import monkey

monkey.patch_all()

import argparse
import http.client
import json
import os
import shutil
import sys
import tempfile
import time

import urllib3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

import llm  # noqa: E402
import loadgen  # noqa: E402
from run import INSTANT_REPLY, FakeModel, Processes, percentile  # noqa: E402

MESSAGES = [{"role": "user", "content": "Hello, how are you today?"}]
BODY = json.dumps({"model": "m", "messages": MESSAGES, "stream": True}).encode()
PATH = "/v1/chat/completions"
HEADERS = {"Content-Type": "application/json", "Accept-Encoding": "identity"}


def first_content(pieces):
    """Read SSE pieces to the end; the time the first content chunk arrived."""
    first = None
    for payload, arrived in loadgen.sse_data(pieces):
        if first is None and payload != b"[DONE]" and json.loads(payload)["choices"][0]["delta"].get("content"):
            first = arrived
    return first


def timed(response):
    """A response body's pieces as they arrive, each with its arrival time."""
    for piece in iter(lambda: response.read1(65536), b""):
        yield piece, time.monotonic()


def clients(port):
    """{name: a function that sends one request and returns the seconds to its first chunk}."""
    raw = loadgen.Connection(f"http://127.0.0.1:{port}", 30)
    plain = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    pool = urllib3.HTTPConnectionPool("127.0.0.1", port, maxsize=1, retries=False, timeout=30)
    service = llm.OpenAIChatModel(f"http://127.0.0.1:{port}/v1", None, "m", 30)

    def via_raw():
        sent = raw.send("POST", PATH, BODY, HEADERS)
        _, head = raw.read_head()
        return first_content(raw.body(head)) - sent

    def via_http_client():
        sent = time.monotonic()
        plain.request("POST", PATH, BODY, HEADERS)
        return first_content(timed(plain.getresponse())) - sent

    def via_urllib3():
        sent = time.monotonic()
        response = pool.urlopen("POST", PATH, body=BODY, headers=HEADERS, preload_content=False)
        first = first_content(timed(response))
        response.release_conn()
        return first - sent

    def via_service():
        sent = time.monotonic()
        stream = service.open_stream(MESSAGES)
        pieces = iter(stream)  # one reading of the stream: a second iter() would start a parser of its own
        next(pieces)
        first = time.monotonic()
        for _ in pieces:
            pass
        stream.finish()
        return first - sent

    return {"raw socket": via_raw, "http.client": via_http_client, "urllib3": via_urllib3, "service": via_service}


def main():
    """Start the fake model, time every client round after round, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="requests through each client")
    args = parser.parse_args()
    processes = Processes(tempfile.mkdtemp(prefix="chat-clients-"))
    try:
        port = FakeModel(processes, "fake-clients", "--reply", INSTANT_REPLY).port
        each = clients(port)
        times = {name: [] for name in each}
        for round_ in range(args.n + 100):
            for name, ask in each.items():
                seconds = ask()
                if round_ >= 100:  # the first hundred rounds warm up
                    times[name].append(seconds * 1000)
        print(f"time to the first chunk, {args.n} requests each, interleaved (ms)")
        print(f"{'client':<12} {'p50':>7} {'p95':>7}")
        for name, values in times.items():
            print(f"{name:<12} {percentile(values, 50):7.3f} {percentile(values, 95):7.3f}")
    finally:
        processes.stop_all()
        shutil.rmtree(processes.log_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
