"""The benchmark's load-generating client: one process, gevent greenlets, raw HTTP/1.1 sockets.

bench/run.py starts this in separate processes, so that client CPU is never counted as the
service's:

    python bench/loadgen.py CONFIG.json RESULT.json

CONFIG["mode"] is one of

- ``latency``: the same chat turn sent to the upstream model directly and through the
  service, interleaved, one at a time on two keep-alive connections; records the time to the
  first content chunk (``kind: stream``) or to the whole answer (``kind: run``).
- ``streams``: N concurrent ``/chat/stream`` requests, started evenly over a ramp; records
  the gaps between consecutive content chunks, failures, and when each stream opened and closed.
- ``turns``: a closed loop of ``/chat/run`` on C keep-alive connections; counts the turns
  completed inside a measurement window.
- ``relay``: N concurrent streams, started evenly over a ramp, either straight from the model
  (``target: direct``, the request the service would send) or through ``/chat/stream``
  (``target: service``); records when each content chunk of each stream arrived.

Every time is ``time.monotonic()``, which is one clock for every process on the machine, so
run.py can hand out start times and measurement windows. Every wait is bounded by a socket
timeout and by CONFIG["deadline"].
"""

from gevent import monkey

monkey.patch_all()

import collections
import json
import os
import resource
import socket
import sys
import time
from urllib.parse import urlsplit

import gevent

READ_SIZE = 65536


class ProtocolError(Exception):
    """The server answered something this client does not understand."""


class Connection:
    """One HTTP/1.1 keep-alive connection, read by hand so every byte's arrival time is known."""

    def __init__(self, url, timeout):
        """Not connected until the first request."""
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.timeout = timeout
        self.sock = None
        self.buf = b""
        self.arrived = 0.0

    def close(self):
        """Close the socket; the next request reconnects."""
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None
        self.buf = b""

    def send(self, method, path, body, headers):
        """Send one request (connecting first if needed); returns the time it was sent."""
        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buf = b""
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                f"Content-Length: {len(body)}"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        data = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        sent = time.monotonic()
        self.sock.sendall(data)
        return sent

    def _fill(self):
        """Receive more bytes; note when they arrived."""
        data = self.sock.recv(READ_SIZE)
        if not data:
            raise EOFError("the server closed the connection")
        self.arrived = time.monotonic()
        self.buf += data

    def _line(self):
        """The next CRLF-terminated line, without its CRLF."""
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line, self.buf = self.buf[:end], self.buf[end + 2:]
                return line
            if len(self.buf) > 65536:
                raise ProtocolError("line too long")
            self._fill()

    def _exactly(self, size):
        """The next `size` bytes."""
        while len(self.buf) < size:
            self._fill()
        data, self.buf = self.buf[:size], self.buf[size:]
        return data

    def read_head(self):
        """The status code and lower-cased headers of the response."""
        parts = self._line().split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ProtocolError(f"not an HTTP status line: {parts!r}")
        status = int(parts[1])
        headers = {}
        while line := self._line():
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode()] = value.strip().decode()
        return status, headers

    def body(self, headers):
        """Yield (bytes, arrival time) pieces of the body: one per HTTP chunk, or the whole body."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    while self._line():
                        pass
                    break
                data = self._exactly(size)
                if self._exactly(2) != b"\r\n":
                    raise ProtocolError("bad chunk framing")
                yield data, self.arrived
        elif "content-length" in headers:
            yield self._exactly(int(headers["content-length"])), self.arrived
        else:
            while True:
                try:
                    self._fill()
                except EOFError:
                    break
            data, self.buf = self.buf, b""
            self.close()
            yield data, self.arrived
            return
        if headers.get("connection", "").lower() == "close":
            self.close()

    def read_all(self, headers):
        """The whole body, and when its last byte arrived."""
        parts, arrived = [], 0.0
        for data, arrived in self.body(headers):
            parts.append(data)
        return b"".join(parts), arrived


def sse_data(pieces):
    """Yield (data payload, arrival time) of each server-sent event in the body pieces."""
    pending = b""
    for data, arrived in pieces:
        pending += data
        while (end := pending.find(b"\n\n")) >= 0:
            block, pending = pending[:end], pending[end + 2:]
            for line in block.split(b"\n"):
                if line.startswith(b"data:"):
                    yield line[5:].strip(), arrived


def bearer(token):
    """The headers of a JSON request with a bearer token."""
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


# --- latency -------------------------------------------------------------------------------


class Latency:
    """One-at-a-time requests, direct to the upstream and through the service."""

    def __init__(self, config):
        """Two keep-alive connections: the upstream's and the service's."""
        self.config = config
        self.service = Connection(config["service_url"], config["timeout"])
        self.upstream = Connection(config["upstream_url"], config["timeout"])
        self.upstream_path = urlsplit(config["upstream_url"]).path.rstrip("/") + "/chat/completions"
        self.headers = bearer(config["token"])

    def direct(self, message, stream):
        """Ask the upstream directly, exactly as the service does; (first content, end) times."""
        body = {"model": self.config["model"], "messages": [{"role": "user", "content": message}],
                "stream": stream}
        headers = {"Content-Type": "application/json"}
        if stream:
            body["stream_options"] = {"include_usage": True}
            headers["Accept-Encoding"] = "identity"
        sent = self.upstream.send("POST", self.upstream_path, json.dumps(body).encode(), headers)
        status, head = self.upstream.read_head()
        if status != 200:
            self.upstream.read_all(head)
            raise ProtocolError(f"upstream answered {status}")
        if not stream:
            answer, ended = self.upstream.read_all(head)
            if not json.loads(answer)["choices"][0]["message"]["content"]:
                raise ProtocolError("empty completion")
            return ended - sent, ended - sent
        first = done = None
        for payload, arrived in sse_data(self.upstream.body(head)):
            if payload == b"[DONE]":
                done = arrived
                continue
            event = json.loads(payload)
            if first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = arrived
        if first is None or done is None:
            raise ProtocolError("the upstream stream had no content or no [DONE]")
        return first - sent, done - sent

    def through(self, message, conversation_id, stream):
        """Ask the service; (first content, end) times."""
        body = json.dumps({"message": message, "conversation_id": conversation_id}).encode()
        path = "/chat/stream" if stream else "/chat/run"
        sent = self.service.send("POST", path, body, self.headers)
        status, head = self.service.read_head()
        if status != 200:
            answer, _ = self.service.read_all(head)
            raise ProtocolError(f"service answered {status}: {answer[:200]!r}")
        if not stream:
            answer, ended = self.service.read_all(head)
            if not json.loads(answer)["response"]:
                raise ProtocolError("empty response")
            return ended - sent, ended - sent
        first = final = None
        for payload, arrived in sse_data(self.service.body(head)):
            event = json.loads(payload)
            if event.get("is_final"):
                if event.get("error"):
                    raise ProtocolError(f"final event with error {event['error']}")
                final = arrived
            elif first is None and event.get("content"):
                first = arrived
        if first is None or final is None:
            raise ProtocolError("the service's stream had no content or no final event")
        return first - sent, final - sent

    def run(self):
        """Warm up, then alternate direct and service requests; milliseconds each."""
        config = self.config
        stream = config["kind"] == "stream"
        deadline = config["deadline"]
        results = {"direct": [], "service": [], "direct_total": [], "service_total": [], "errors": []}
        total = config["warmup"] + config["n"]
        for i in range(total):
            if time.monotonic() > deadline or len(results["errors"]) > max(5, total // 10):
                break
            message = f"{config['message']} ({i})"
            # Alternate which goes first, so neither side always runs right after the other.
            order = ("direct", "service") if i % 2 == 0 else ("service", "direct")
            for side in order:
                connection = self.upstream if side == "direct" else self.service
                try:
                    if side == "direct":
                        first, end = self.direct(message, stream)
                    else:
                        first, end = self.through(message, f"{config['prefix']}-{i}", stream)
                except (OSError, EOFError, ProtocolError, ValueError, KeyError, IndexError) as exc:
                    connection.close()
                    results["errors"].append(f"{side}: {type(exc).__name__}: {exc}"[:300])
                    continue
                if i >= config["warmup"]:
                    results[side].append(first * 1000)
                    results[side + "_total"].append(end * 1000)
        return results


# --- streams -------------------------------------------------------------------------------


def one_stream(config, index, record):
    """Open one /chat/stream at its slot in the ramp and follow it to its final event."""
    start = config["start_at"] + index * config["ramp"] / max(1, config["total"])
    gevent.sleep(max(0.0, start - time.monotonic()))
    connection = Connection(config["service_url"], config["timeout"])
    token = config["tokens"][index % len(config["tokens"])]
    body = json.dumps({"message": f"stream {index}, tell me a long story",
                       "conversation_id": f"{config['prefix']}-{index}"}).encode()
    try:
        record["sent"] = connection.send("POST", "/chat/stream", body, bearer(token))
        status, head = connection.read_head()
        if status != 200:
            record["error"] = f"http {status}"
            answer, _ = connection.read_all(head)
            try:
                record["error"] += " " + json.loads(answer)["error"]["code"]
            except (ValueError, KeyError, TypeError):
                pass
            return
        last = None
        for payload, arrived in sse_data(connection.body(head)):
            event = json.loads(payload)
            if event.get("is_final"):
                record["ended"] = arrived
                if event.get("error"):
                    record["error"] = "final event error: " + str(event["error"].get("code"))
                continue
            if event.get("content"):
                record["chunks"] += 1
                if last is None:
                    record["first"] = arrived
                else:
                    record["gaps"].append(arrived - last)
                last = arrived
        if record["ended"] is None and record["error"] is None:
            record["error"] = "no final event"
        elif record["error"] is None and record["chunks"] != config["expect_chunks"]:
            record["error"] = f"{record['chunks']} chunks, not {config['expect_chunks']}"
    except TimeoutError:
        record["error"] = "timeout"
    except (OSError, EOFError, ProtocolError, ValueError) as exc:
        record["error"] = type(exc).__name__
    finally:
        connection.close()


def streams(config):
    """Run this process's share of the concurrent streams."""
    records = []
    greenlets = []
    for index in range(config["first"], config["total"], config["stride"]):
        record = {"sent": None, "first": None, "ended": None, "chunks": 0, "gaps": [], "error": None}
        records.append(record)
        greenlets.append(gevent.spawn(one_stream, config, index, record))
    gevent.joinall(greenlets, timeout=max(1.0, config["deadline"] - time.monotonic()))
    unfinished = sum(not g.dead for g in greenlets)
    gevent.killall([g for g in greenlets if not g.dead], block=True, timeout=5)
    failures = collections.Counter()
    for record, greenlet in zip(records, greenlets):
        if record["error"] is None and record["ended"] is None:
            record["error"] = "unfinished at the deadline"
        if record["error"] is not None:
            failures[record["error"]] += 1
    return {
        "streams": len(records),
        "unfinished": unfinished,
        "failures": dict(failures),
        "gaps_ms": [round(gap * 1000, 3) for record in records for gap in record["gaps"]],
        "first_ms": [round((r["first"] - r["sent"]) * 1000, 3) for r in records if r["first"] and r["sent"]],
        "intervals": [[r["sent"], r["ended"]] for r in records if r["sent"] and r["ended"]],
    }


# --- relay -------------------------------------------------------------------------------


def model_event(payload):
    """(content, is the end, error) of one event of the model's own stream."""
    if payload == b"[DONE]":
        return None, True, None
    choices = json.loads(payload).get("choices") or []
    return (choices[0].get("delta") or {}).get("content") if choices else None, False, None


def service_event(payload):
    """(content, is the end, error) of one event of /chat/stream."""
    event = json.loads(payload)
    if event.get("is_final"):
        error = event.get("error")
        return None, True, error and f"final event error: {error.get('code')}"
    return event.get("content"), False, None


def relay_request(config, index):
    """(url, path, body, headers, event parser) of stream `index`: to the model, or to the service."""
    message = f"stream {index}, tell me a long story"
    if config["target"] == "direct":
        path = urlsplit(config["upstream_url"]).path.rstrip("/") + "/chat/completions"
        body = {"model": config["model"], "messages": [{"role": "user", "content": message}], "stream": True,
                "stream_options": {"include_usage": True}}
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        return config["upstream_url"], path, body, headers, model_event
    body = {"message": message, "conversation_id": f"{config['prefix']}-{index}"}
    headers = bearer(config["tokens"][index % len(config["tokens"])])
    return config["service_url"], "/chat/stream", body, headers, service_event


def relay_stream(config, index, record):
    """Open one stream at its slot in the ramp and note when each of its content chunks arrives."""
    start = config["start_at"] + index * config["ramp"] / max(1, config["total"])
    gevent.sleep(max(0.0, start - time.monotonic()))
    url, path, body, headers, parse = relay_request(config, index)
    connection = Connection(url, config["timeout"])
    try:
        connection.send("POST", path, json.dumps(body).encode(), headers)
        status, head = connection.read_head()
        if status != 200:
            connection.read_all(head)
            record["error"] = f"http {status}"
            return
        for payload, arrived in sse_data(connection.body(head)):
            content, ended, error = parse(payload)
            if ended:
                record["ended"], record["error"] = arrived, error
            elif content:
                record["arrivals"].append(arrived)
        if record["ended"] is None and record["error"] is None:
            record["error"] = "no end of stream"
        elif record["error"] is None and len(record["arrivals"]) != config["expect_chunks"]:
            record["error"] = f"{len(record['arrivals'])} chunks, not {config['expect_chunks']}"
    except TimeoutError:
        record["error"] = "timeout"
    except (OSError, EOFError, ProtocolError, ValueError) as exc:
        record["error"] = type(exc).__name__
    finally:
        connection.close()


def relay(config):
    """Run this process's share of the relayed streams: every complete stream's chunk arrival times."""
    indexes = range(config["first"], config["total"], config["stride"])
    records = [{"arrivals": [], "ended": None, "error": None} for _ in indexes]
    greenlets = [gevent.spawn(relay_stream, config, index, record) for index, record in zip(indexes, records)]
    gevent.joinall(greenlets, timeout=max(1.0, config["deadline"] - time.monotonic()))
    gevent.killall([g for g in greenlets if not g.dead], block=True, timeout=5)
    failures = collections.Counter()
    for record in records:
        if record["error"] is None and record["ended"] is None:
            record["error"] = "unfinished at the deadline"
        if record["error"] is not None:
            failures[record["error"]] += 1
    return {"streams": len(records), "failures": dict(failures),
            "arrivals": [[round(t, 6) for t in r["arrivals"]] for r in records if r["error"] is None]}


# --- turns ---------------------------------------------------------------------------------


def turn_loop(config, number, tally):
    """One client connection asking /chat/run turns back to back until stop_at."""
    connection = Connection(config["service_url"], config["timeout"])
    headers = bearer(config["tokens"][number % len(config["tokens"])])
    gevent.sleep(max(0.0, config["start_at"] - time.monotonic()))
    tally["started"] = min(tally.get("started", 1e18), time.monotonic())
    turn = 0
    while time.monotonic() < config["stop_at"] and tally["errors_total"] < 1000:
        body = json.dumps({"message": f"turn {turn} from client {number}: how are you?",
                           "conversation_id": f"{config['prefix']}-{number}-{turn}"}).encode()
        turn += 1
        try:
            sent = connection.send("POST", "/chat/run", body, headers)
            status, head = connection.read_head()
            _, ended = connection.read_all(head)
        except (OSError, EOFError, ProtocolError, ValueError) as exc:
            connection.close()
            tally["errors"][type(exc).__name__] += 1
            tally["errors_total"] += 1
            gevent.sleep(0.01)
            continue
        if status != 200:
            tally["errors"][f"http {status}"] += 1
            tally["errors_total"] += 1
            continue
        if config["measure_from"] <= ended < config["measure_until"]:
            tally["turns"] += 1
            tally["latencies_ms"].append(round((ended - sent) * 1000, 3))
    connection.close()


def turns(config):
    """Closed-loop /chat/run load on this process's connections."""
    tally = {"turns": 0, "latencies_ms": [], "errors": collections.Counter(), "errors_total": 0}
    greenlets = [gevent.spawn(turn_loop, config, config["first_connection"] + n, tally)
                 for n in range(config["connections"])]
    gevent.joinall(greenlets, timeout=max(1.0, config["deadline"] - time.monotonic()))
    gevent.killall([g for g in greenlets if not g.dead], block=True, timeout=5)
    tally["errors"] = dict(tally["errors"])
    tally["late_start"] = tally.get("started", 1e18) > config["measure_from"]
    tally.pop("started", None)
    return tally


def main(config_path, result_path):
    """Run the configured load and write its result as JSON."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with open(config_path) as source:
        config = json.load(source)
    mode = config["mode"]
    if mode == "latency":
        result = Latency(config).run()
    elif mode == "streams":
        result = streams(config)
    elif mode == "turns":
        result = turns(config)
    elif mode == "relay":
        result = relay(config)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["client_cpu_s"] = usage.ru_utime + usage.ru_stime
    with open(result_path + ".tmp", "w") as out:
        json.dump(result, out)
    # Rename, so run.py never reads half a file.
    os.replace(result_path + ".tmp", result_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
