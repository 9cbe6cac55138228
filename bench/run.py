"""Benchmark of the chat API under gunicorn + gevent, against a fake OpenAI-compatible model.

Usage, from the repository root, with the project's virtualenv:

    .venv/bin/python bench/run.py [--quick] [--out bench/results] [--phases relay,latency] [--profile]

It needs PostgreSQL and Redis (``--database-url``, default
postgresql://root@127.0.0.1:5432/chat_bench, created if missing and its tables recreated;
``--redis-url``, default redis://127.0.0.1:6379/9, flushed). Everything else it starts itself
on loopback and stops at the end, also on Ctrl-C or an error: the fake model
(``python -m tests.fake_llm --gevent``), the service (``gunicorn --config gunicorn.conf.py
'chat_app:create_app()'`` in production mode, on the default settings) and the load generators (bench/loadgen.py, each
a separate gevent process, so their CPU is never counted as the service's). Every process is
started in its own session and its whole process group is killed on the way out.

It measures, and writes as results.md and results.json in --out (with the logs in
``--out/logs``):

- added time to first token: the same streamed request sent to the model directly and through
  /chat/stream, interleaved, one at a time; p50/p95/p99 of each and the difference;
- added total time of /chat/run against the model's non-streamed answer, likewise;
- open streams one gevent worker carries: a slow model (a chunk every 500 ms for 20 s),
  concurrent streams ramped through levels until one fails or the p95 gap between chunks
  seen by the clients exceeds 600 ms; the largest clean level;
- memory per open stream: the worker's VmRSS at the peak of that level minus before it,
  per stream (each level runs on a freshly started worker);
- CPU per turn: the worker's utime+stime over a window of closed-loop /chat/run load at
  saturation, divided by the turns completed in it;
- scaling: turns per second with 1 and 2 workers;
- worker CPU per relayed chunk: 200 concurrent /chat/stream streams on one worker, each 100
  chunks of a paced model 20 ms apart; the worker's utime+stime over the window in which every
  stream is relaying, divided by the chunks the clients received in it;
- the chunk delay the service adds: the same streams straight from the model and through the
  service, one after the other with the same client code; each chunk's lateness against its
  stream's 20 ms schedule, p50/p99 of each and the difference.

Side by side in the same run: CPU per turn with METRICS=off (and, in a full run, with the database
pool sized to the load, DATABASE_POOL_SIZE=32), and what the meter's calls cost a turn, timed
in-process. The latency, turns and relay phases also run on two floors, so that each target is
seen against what the stack itself costs on the machine: the plain way (bench/floor/chat_app.py,
the specification's two endpoints written plainly with Flask, flask-jwt-extended, Peewee and
requests, with nothing of the product's own; also at the last open-streams level) and the bare
minimum (bench/floor/bare.py: a WSGI function, one Redis round trip before the model and one
after, one INSERT in autocommit, and one recv, one json.loads and one send a chunk). With
``--against REVISION`` (repeatable), the latency, turns and relay phases also run on the service
as it was at that git revision (exported with ``git archive``, on a database of its own), so a
change is measured before and after in one run on the same noisy machine.

PostgreSQL's and Redis's CPU is reported for context, never counted as the worker's. Targets
that are missed are reported, not asserted: the exit status is 0 unless something crashed.
The run raises its limit on open files to the hard limit; every process it starts inherits it.

Every service started keeps up to DATABASE_POOL_SIZE connections open: with the floors, the variants and
two ``--against`` revisions, the run keeps up to 92, within PostgreSQL's default max_connections of 100.

``--quick`` (about 2 minutes, used by tests/test_bench.py) runs fewer requests, stream levels of
50 and 100, 3 s windows and 50 relayed streams of 60 chunks; the full run takes about 8 minutes
on 2 cores. ``--levels 500,1000`` replaces the mode's stream levels. ``--phases`` runs only some
of the phases, ``latency`` (the first two above), ``turns`` (CPU per turn and scaling),
``streams`` (open streams and memory) and ``relay`` (the last two), so that a change can be
tried quickly on the figures it is about (``--phases relay`` takes about a minute); only their
figures are reported. ``--profile`` adds a phase that samples the
worker with py-spy under the same /chat/run load (py-spy must be installed in the
virtualenv) and lists its top functions by self and cumulative time (raw samples in
``--out/profile-raw.txt``).
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlsplit, urlunsplit

import jwt
import psycopg2
import redis
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADGEN = os.path.join(ROOT, "bench", "loadgen.py")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SECRET = "bench-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
MODEL = "bench-model"
USERS = 8
CLIENT_PROCESSES = 2
STREAM_CHUNK_DELAY = 0.5
STREAM_CHUNKS = 41  # 40 gaps of 500 ms: 20 s of streaming
GAP_SLACK_MS = 100
# Streams open at this rate (at most 12 s of ramp), so they are all open for at least 8 s of the 20.
STREAM_OPEN_RATE = 250
# Every service runs on the default settings (as the Procfile does) but for what a benchmark must set;
# CPU per turn is also measured with the database pool sized to the load, as a busy deployment would.
TUNED_POOL_SIZE = 32
RELAY_CHUNK_DELAY = 0.02
# Relayed streams open at this rate, and the model holds each stream's first chunk for a while, so
# that (unless the worker is slow to set them up) the first streams do not relay while the last
# are still being set up. The CPU window starts after the last first chunk in any case.
RELAY_OPEN_RATE = 400
RELAY_FIRST_CHUNK_DELAY = 1.0
# How often the relay phases read every part's CPU, to pick the window afterwards.
SAMPLE_INTERVAL = 0.05
# Cores busy with other processes above which a phase's figures are flagged as noisy.
NOISE_CORES = 0.25
INSTANT_REPLY = ("Sure. Here is a short answer of about forty words, streamed word by word, so "
                 "that the relay does some real work per turn: parsing each chunk, framing each "
                 "event, and keeping the whole reply in the database at the end of the turn.")

# Run beside the service, so that a target is seen against what the stack itself costs on the machine:
# bench/floor/chat_app.py, the specification's endpoints written the plain way on the same stack, and
# bench/floor/bare.py, the least the specification's turn can cost on it (no framework).
FLOOR_ROOT = os.path.join(ROOT, "bench", "floor")
PLAIN_LABEL = "the plain way"
BARE_LABEL = "the bare minimum"
FULL = {"latency_n": 400, "latency_warmup": 20, "levels": [500, 1000, 2000, 3000],
        "turns_seconds": 10.0, "turns_warmup": 2.0, "connections": 48, "profile_seconds": 10,
        "relay_streams": 200, "relay_chunks": 100, "resume_n": 40, "turns_rounds": 3}
QUICK = {"latency_n": 40, "latency_warmup": 10, "levels": [50, 100],
         "turns_seconds": 3.0, "turns_warmup": 1.0, "connections": 32, "profile_seconds": 3,
         "relay_streams": 50, "relay_chunks": 60, "resume_n": 10, "turns_rounds": 1}
PHASES = ("latency", "turns", "streams", "relay", "resume")


def log(message):
    """Progress, on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def raise_file_limit():
    """Raise the soft limit on open files to the hard limit (inherited by every child)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port():
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition, timeout, interval=0.1, what="condition"):
    """Poll `condition` until it is true; RuntimeError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


def percentile(values, q):
    """The q-th percentile (0-100) of values, interpolated linearly; NaN if there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# --- /proc ---------------------------------------------------------------------------------


def proc_stat(pid):
    """(ppid, own CPU ticks, reaped children's CPU ticks) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def proc_comm(pid):
    """The command name of a process ('' if it is gone)."""
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return ""


def proc_cmdline(pid):
    """The command line of a process ('' if it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def all_pids():
    """Every process id on the machine."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def children(pid):
    """The processes whose parent is `pid` (gunicorn's workers, for its master)."""
    found = []
    for other in all_pids():
        stat = proc_stat(other)
        if stat and stat[0] == pid:
            found.append(other)
    return sorted(found)


def rss_kb(pid):
    """VmRSS of a process in kB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_files_limit(pid):
    """The soft limit on open files of a process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/limits") as limits:
            for line in limits:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cpu_ticks(pids, with_reaped=()):
    """{pid: CPU ticks} of processes; for those in `with_reaped`, their reaped children's too."""
    ticks = {}
    for pid in pids:
        stat = proc_stat(pid)
        if stat:
            ticks[pid] = stat[1] + (stat[2] if pid in with_reaped else 0)
    return ticks


def cpu_seconds_between(before, after):
    """CPU seconds used between two cpu_ticks() snapshots (a process new in `after` counts from 0)."""
    return sum(ticks - before.get(pid, 0) for pid, ticks in after.items()) / CLOCK_TICKS


def machine_ticks():
    """(busy, total) CPU ticks of the whole machine, from /proc/stat."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def database_processes(database_name):
    """{'postgres': pids, 'postmaster': pids, 'backends': pids serving database_name, 'redis': pids}."""
    found = {"postgres": [], "postmaster": [], "backends": [], "redis": []}
    for pid in all_pids():
        comm = proc_comm(pid)
        if comm == "postgres" or comm.startswith("postgres:"):
            found["postgres"].append(pid)
            stat = proc_stat(pid)
            if stat and proc_comm(stat[0]) != "postgres":
                found["postmaster"].append(pid)
            if f" {database_name} " in proc_cmdline(pid):
                found["backends"].append(pid)
        elif comm == "redis-server":
            found["redis"].append(pid)
    return found


class CpuWatch:
    """CPU snapshots of the service's workers, the fake model, PostgreSQL, Redis and the machine."""

    def __init__(self, database_name, workers=(), fake=None, clients=(), master=None):
        """Watch these processes (and the database servers, found by name)."""
        self.database_name = database_name
        self.workers = list(workers)
        self.fake = fake
        self.clients = list(clients)
        self.master = master

    def snapshot(self):
        """Every figure, now."""
        db = database_processes(self.database_name)
        return {
            "at": time.monotonic(),
            "workers": {pid: cpu_ticks([pid]).get(pid, 0) for pid in self.workers},
            "fake": cpu_ticks([self.fake] if self.fake else []),
            "clients": cpu_ticks(self.clients),
            "master": cpu_ticks([self.master] if self.master else []),
            # The postmaster's reaped children hold the CPU of backends that exited meanwhile.
            "postgres": cpu_ticks(db["postgres"], with_reaped=set(db["postmaster"])),
            "backends": cpu_ticks(db["backends"]),
            "redis": cpu_ticks(db["redis"]),
            "machine": machine_ticks(),
        }

    @staticmethod
    def between(before, after, clients_s=None):
        """CPU seconds each part used between two snapshots, and the wall time.

        `clients_s`, if given, is the load generators' own count of their CPU (when they have
        exited before the second snapshot, /proc no longer has it).
        """
        wall = after["at"] - before["at"]
        busy = after["machine"][0] - before["machine"][0]
        total = after["machine"][1] - before["machine"][1]
        machine_busy = (busy / total * (os.cpu_count() or 1)) if total else 0.0
        ours = {part: cpu_seconds_between(before[part], after[part])
                for part in ("workers", "fake", "clients", "postgres", "redis", "master")}
        if clients_s is not None:
            ours["clients"] = clients_s
        return {
            "wall_s": wall,
            "workers_s": {str(pid): (after["workers"][pid] - before["workers"].get(pid, 0)) / CLOCK_TICKS
                          for pid in after["workers"]},
            "worker_total_s": cpu_seconds_between(before["workers"], after["workers"]),
            "fake_s": ours["fake"],
            "clients_s": ours["clients"],
            "postgres_s": cpu_seconds_between(before["postgres"], after["postgres"]),
            "postgres_backends_s": cpu_seconds_between(before["backends"], after["backends"]),
            "redis_s": cpu_seconds_between(before["redis"], after["redis"]),
            # Busy cores over the window: 2.0 is both cores of a 2-core machine flat out.
            "machine_busy_cores": machine_busy,
            # Cores busy with anything but gunicorn, the fake, the clients, PostgreSQL and Redis.
            "other_busy_cores": max(0.0, machine_busy - sum(ours.values()) / wall) if wall else 0.0,
        }


# --- processes -----------------------------------------------------------------------------


class Processes:
    """Everything the benchmark started, each in its own session, stopped by process group."""

    def __init__(self, log_dir):
        """Nothing started yet; logs go to `log_dir`."""
        self.log_dir = log_dir
        self.running = []

    def start(self, name, argv, env=None, cwd=ROOT):
        """Start a process in a new session with its output in `<log_dir>/<name>.log` (overwritten)."""
        # The child inherits the raised limit on open files (main() raised it) and the log file.
        with open(os.path.join(self.log_dir, f"{name}.log"), "wb") as log_file:
            process = subprocess.Popen(argv, cwd=cwd, env=env or os.environ.copy(), stdin=subprocess.DEVNULL,
                                       stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        process.name = name
        self.running.append(process)
        return process

    def stop(self, process, timeout=10):
        """SIGTERM the process group, then SIGKILL what is left after `timeout` seconds."""
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{process.name} did not stop in {timeout} s; killing it")
        # Whatever is left of the group (a worker whose master died, a hung process): SIGKILL.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)
        if process in self.running:
            self.running.remove(process)

    def stop_all(self):
        """Stop everything still running, newest first."""
        for process in reversed(list(self.running)):
            self.stop(process, timeout=5)

    def log_tail(self, name, lines=30):
        """The last lines of a process's log, for error messages."""
        try:
            with open(os.path.join(self.log_dir, f"{name}.log"), errors="replace") as text:
                return "".join(text.readlines()[-lines:])
        except OSError:
            return ""


class FakeModel:
    """tests/fake_llm.py, standalone with gevent, in its own process."""

    def __init__(self, processes, name, *options):
        """Start it with these command-line options on a port it picks itself (a port picked here could be taken
        before it binds it, by a test suite running beside), and wait until it says where it serves."""
        self.processes = processes
        argv = [sys.executable, "-m", "tests.fake_llm", "--port", "0", "--gevent", *options]
        self.process = processes.start(name, argv)
        self.url = None
        wait_until(self._serving, 20, what=f"the fake model ({name}) to serve")
        self.port = urlsplit(self.url).port

    def _serving(self):
        """True once the fake model's log says where it serves; raise if the process died."""
        if self.process.poll() is not None:
            raise RuntimeError(f"the fake model exited:\n{self.processes.log_tail(self.process.name)}")
        found = re.search(r"fake LLM serving (\S+)", self.processes.log_tail(self.process.name))
        self.url = found and found.group(1)
        return self.url is not None

    def stop(self):
        """Stop it."""
        self.processes.stop(self.process)


class Variant:
    """What a service runs: the code (this tree, or a git revision exported to `root`), its database and
    the settings that differ from the defaults."""

    def __init__(self, label, root=ROOT, env=None, database_url=None, phases=()):
        """A variant named `label`; `phases` are the phases it is compared in (none for the main one)."""
        self.label = label
        self.root = root
        self.env = env or {}
        self.database_url = database_url
        self.phases = phases


class Service:
    """The chat service under gunicorn with the gevent worker, as the Procfile runs it."""

    def __init__(self, processes, name, bench, workers, llm_url, variant):
        """Start gunicorn with `workers` workers on the given model, running `variant`; wait until it serves."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.processes = processes
        self.variant = variant
        self.expected_workers = workers
        self.env = {**service_env(bench, llm_url, workers, self.port, variant.database_url), **variant.env}
        argv = [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "chat_app:create_app()"]
        self.process = processes.start(name, argv, env=self.env, cwd=variant.root)
        wait_until(self._ready, 60, interval=0.2, what=f"the service ({name}) to answer /status")

    def _ready(self):
        """True once /status says ok and every worker is up; raise if gunicorn exited."""
        if self.process.poll() is not None:
            raise RuntimeError(f"gunicorn exited:\n{self.processes.log_tail(self.process.name)}")
        if len(self.workers()) != self.expected_workers:
            return False
        try:
            answer = requests.get(self.url + "/status", timeout=2)
            return answer.status_code == 200 and answer.json()["status"] == "ok"
        except (requests.RequestException, ValueError):
            return False

    def workers(self):
        """The pids of gunicorn's workers: the master's children."""
        return children(self.process.pid)

    def warm_up(self, tokens, turns=20):
        """A few turns, so every worker has its connections to the database, Redis and the model.

        A new connection for each, so that every worker accepts some.
        """
        for n in range(turns):
            answer = requests.post(self.url + "/chat/run", timeout=30,
                                   headers={"Authorization": f"Bearer {tokens[n % len(tokens)]}"},
                                   json={"message": "warm up", "conversation_id": f"warm-{uuid_hex()}"})
            if answer.status_code != 200:
                raise RuntimeError(f"warm-up turn failed: {answer.status_code} {answer.text[:300]}")

    def stop(self):
        """Stop gunicorn (and its workers)."""
        self.processes.stop(self.process, timeout=15)


def slug(label):
    """A label as a piece of a file name."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def uuid_hex():
    """A random hex string."""
    return os.urandom(8).hex()


def service_env(bench, llm_url, workers, port, database_url):
    """The service's environment: production mode on PostgreSQL, Redis and the fake model, every other
    setting at its default."""
    env = os.environ.copy()
    env.update({
        "APP_ENV": "production", "JWT_SECRET_KEY": SECRET, "DATABASE_URL": database_url,
        "REDIS_URL": bench.redis_url, "LLM_BASE_URL": llm_url, "LLM_MODEL": MODEL,
        "WEB_CONCURRENCY": str(workers), "LOG_LEVEL": "warning", "PORT": str(port),
        "GRACEFUL_TIMEOUT": "5",
        # The load is a few users with thousands of streams: the per-user cap is not what is measured.
        "MAX_STREAMS_PER_USER": "1000000",
    })
    return env


class Clients:
    """bench/loadgen.py processes running one load together."""

    def __init__(self, processes, work_dir, name, configs):
        """Start one load generator per config."""
        self.processes = processes
        self.started = []
        for n, config in enumerate(configs):
            config_path = os.path.join(work_dir, f"{name}-{n}.json")
            result_path = os.path.join(work_dir, f"{name}-{n}.result.json")
            with contextlib.suppress(FileNotFoundError):
                os.remove(result_path)
            with open(config_path, "w") as out:
                json.dump(config, out)
            process = processes.start(f"{name}-{n}", [sys.executable, LOADGEN, config_path, result_path])
            self.started.append((process, result_path))

    def pids(self):
        """The load generators' process ids."""
        return [process.pid for process, _ in self.started]

    def running(self):
        """Whether any load generator is still running."""
        return any(process.poll() is None for process, _ in self.started)

    def collect(self, timeout):
        """Wait (at most `timeout` s) for every load generator; their results."""
        deadline = time.monotonic() + timeout
        results = []
        for process, result_path in self.started:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.processes.stop(process)
                raise RuntimeError(f"load generator {process.name} did not finish in time") from None
            self.processes.stop(process)
            if process.returncode != 0 or not os.path.exists(result_path):
                raise RuntimeError(f"load generator {process.name} failed ({process.returncode}):\n"
                                   f"{self.processes.log_tail(process.name)}")
            with open(result_path) as source:
                results.append(json.load(source))
        return results


# --- the benchmark -------------------------------------------------------------------------


class Bench:
    """One run of the benchmark: its settings, its processes and what it measured."""

    def __init__(self, args):
        """Settings from the command line."""
        self.args = args
        self.settings = QUICK if args.quick else FULL
        if args.levels:
            self.settings = {**self.settings, "levels": [int(n) for n in args.levels.split(",")]}
        self.database_url = args.database_url
        self.database_name = urlsplit(args.database_url).path.lstrip("/")
        self.redis_url = args.redis_url
        self.out = os.path.abspath(args.out)
        os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)
        self.work_dir = tempfile.mkdtemp(prefix="chat-bench-")
        self.processes = Processes(os.path.join(self.out, "logs"))
        now = int(time.time())
        self.tokens = [jwt.encode({"sub": f"bench-{n}", "iat": now, "exp": now + 3600}, SECRET, "HS256")
                       for n in range(USERS)]
        self.phases = args.phases
        self.results = {"phases": {}}
        self.figures = {}
        self.notes = []
        self.main = Variant("this tree", database_url=args.database_url)
        self.variants = self.compared_variants(args.against)

    def compared_variants(self, revisions):
        """What runs beside this tree: metrics off and a larger pool (for CPU per turn), the plain way and the bare
        minimum (bench/floor), and the given git revisions (for latency, CPU per turn and the relay)."""
        variants = [Variant("METRICS=off", env={"METRICS": "off"}, database_url=self.database_url,
                            phases=("turns",))]
        if not self.args.quick:
            variants.append(Variant(f"DATABASE_POOL_SIZE={TUNED_POOL_SIZE}", database_url=self.database_url,
                                    env={"DATABASE_POOL_SIZE": str(TUNED_POOL_SIZE)}, phases=("turns",)))
        variants.append(Variant(PLAIN_LABEL, root=FLOOR_ROOT, database_url=f"{self.database_url}_floor",
                                phases=("latency", "turns", "relay", "streams")))
        # The same folder and database (prepared once, by the plain way's init-db), serving bare.py.
        variants.append(Variant(BARE_LABEL, root=FLOOR_ROOT, env={"FLOOR": "bare"},
                                database_url=f"{self.database_url}_floor", phases=("latency", "turns", "relay")))
        for revision in revisions:
            sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--verify", f"{revision}^{{commit}}"], check=True,
                                 capture_output=True, text=True).stdout.strip()
            root = os.path.join(self.work_dir, f"rev-{sha[:10]}")
            os.makedirs(root)
            archive = subprocess.Popen(["git", "-C", ROOT, "archive", sha], stdout=subprocess.PIPE)
            subprocess.run(["tar", "-x", "-C", root], stdin=archive.stdout, check=True)
            archive.wait()
            variants.append(Variant(f"{revision} ({sha[:10]})", root=root,
                                    database_url=f"{self.database_url}_{sha[:10]}", phases=("latency", "turns", "relay")))
        return variants

    def compared_in(self, phase):
        """The variants compared with this tree in `phase`, if it runs."""
        return [variant for variant in self.variants if phase in variant.phases and phase in self.phases]

    def close(self):
        """Stop everything and remove the scratch files."""
        self.processes.stop_all()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    # setup

    def prepare_stores(self):
        """Empty the Redis database, and give each variant's code a database with fresh tables."""
        client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        client.flushdb()
        client.close()
        prepared = set()
        for variant in [self.main] + self.variants:
            if (variant.database_url, variant.root) not in prepared:
                prepared.add((variant.database_url, variant.root))
                self.prepare_database(variant)

    def prepare_database(self, variant):
        """Create the variant's database if missing and recreate its tables with its own init-db."""
        parts = urlsplit(variant.database_url)
        name = parts.path.lstrip("/")
        admin = psycopg2.connect(urlunsplit(parts._replace(path="/postgres")), connect_timeout=5)
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cursor.fetchone() is None:
                cursor.execute(f'CREATE DATABASE "{name}"')
        admin.close()
        with contextlib.closing(psycopg2.connect(variant.database_url, connect_timeout=5)) as conn:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute("DROP TABLE IF EXISTS chat_message, chat_conversation, message, conversation, floormessage CASCADE")
        env = {**service_env(self, "http://127.0.0.1:9/v1", 1, 0, variant.database_url), **variant.env}
        env.pop("FLOOR", None)  # bench/floor's init-db is the plain way's
        subprocess.run([sys.executable, "-m", "flask", "--app", "chat_app", "init-db"], cwd=variant.root, env=env,
                       check=True, timeout=60, stdout=subprocess.DEVNULL)

    # phases

    def latency(self, service, fake, kind):
        """Interleaved direct and through-the-service requests, one at a time."""
        n, warmup = self.settings["latency_n"], self.settings["latency_warmup"]
        config = {"mode": "latency", "kind": kind, "service_url": service.url, "upstream_url": fake.url,
                  "token": self.tokens[0], "model": MODEL, "message": "Hello, how are you today?",
                  "prefix": f"latency-{kind}-{uuid_hex()}", "n": n, "warmup": warmup, "timeout": 30,
                  "deadline": time.monotonic() + 60 + n * 0.5}
        clients = Clients(self.processes, self.work_dir, f"latency-{kind}", [config])
        watch = CpuWatch(self.database_name, service.workers(), fake.process.pid, master=service.process.pid)
        before = watch.snapshot()
        result = clients.collect(90 + n * 0.5)[0]
        cpu = CpuWatch.between(before, watch.snapshot(), clients_s=result["client_cpu_s"])
        if result["errors"]:
            self.notes.append(f"latency ({kind}): {len(result['errors'])} failed requests, "
                              f"e.g. {result['errors'][0]}")
        summary = {"n": len(result["service"]), "errors": len(result["errors"]),
                   "machine_busy_cores": cpu["machine_busy_cores"], "other_busy_cores": cpu["other_busy_cores"]}
        for side in ("direct", "service"):
            for q in (50, 95, 99):
                summary[f"{side}_p{q}_ms"] = percentile(result[side], q)
        for q in (50, 95, 99):
            summary[f"added_p{q}_ms"] = summary[f"service_p{q}_ms"] - summary[f"direct_p{q}_ms"]
        paired = [s - d for s, d in zip(result["service"], result["direct"])]
        summary["paired_difference_p50_ms"] = percentile(paired, 50)
        if kind == "stream":
            summary["service_stream_total_p50_ms"] = percentile(result["service_total"], 50)
            summary["direct_stream_total_p50_ms"] = percentile(result["direct_total"], 50)
        return summary

    def turns(self, service, fake, label, profile_seconds=0):
        """Closed-loop /chat/run load at saturation; CPU of every part over the measurement window."""
        settings = self.settings
        connections = settings["connections"]
        start_at = time.monotonic() + 2.0
        measure_from = start_at + settings["turns_warmup"]
        window = profile_seconds or settings["turns_seconds"]
        measure_until = measure_from + window
        per_process = connections // CLIENT_PROCESSES
        configs = [{"mode": "turns", "service_url": service.url, "tokens": self.tokens,
                    "prefix": f"{label}-{uuid_hex()}", "connections": per_process,
                    "first_connection": n * per_process, "start_at": start_at, "measure_from": measure_from,
                    "measure_until": measure_until, "stop_at": measure_until + 0.3, "timeout": 30,
                    "deadline": measure_until + 20} for n in range(CLIENT_PROCESSES)]
        clients = Clients(self.processes, self.work_dir, label, configs)
        watch = CpuWatch(self.database_name, service.workers(), fake.process.pid, clients.pids(),
                         master=service.process.pid)
        sleep_until(measure_from)
        before = watch.snapshot()
        spy = self.start_profiler(service.workers()[0], window) if profile_seconds else None
        sleep_until(measure_until)
        after = watch.snapshot()
        results = clients.collect(60)
        cpu = CpuWatch.between(before, after)
        turns = sum(r["turns"] for r in results)
        errors = {}
        for result in results:
            for key, count in result["errors"].items():
                errors[key] = errors.get(key, 0) + count
        if any(r["late_start"] for r in results):
            self.notes.append(f"{label}: a load generator started after the measurement window opened")
        if errors:
            self.notes.append(f"{label}: failed requests {errors}")
        latencies = [ms for r in results for ms in r["latencies_ms"]]
        summary = {
            "workers": len(service.workers()), "connections": connections, "window_s": cpu["wall_s"],
            "turns": turns, "turns_per_s": turns / cpu["wall_s"], "errors": errors,
            "latency_p50_ms": percentile(latencies, 50), "latency_p95_ms": percentile(latencies, 95),
            "worker_cpu_s": cpu["worker_total_s"], "worker_cpu_s_each": cpu["workers_s"],
            "worker_cpu_per_turn_ms": cpu["worker_total_s"] / turns * 1000 if turns else float("nan"),
            "worker_busy_cores": cpu["worker_total_s"] / cpu["wall_s"],
            "fake_cpu_s": cpu["fake_s"], "clients_cpu_s": cpu["clients_s"],
            "postgres_cpu_s": cpu["postgres_s"], "postgres_backends_cpu_s": cpu["postgres_backends_s"],
            "redis_cpu_s": cpu["redis_s"], "machine_busy_cores": cpu["machine_busy_cores"],
            "other_busy_cores": cpu["other_busy_cores"],
        }
        if turns:
            summary["postgres_cpu_per_turn_ms"] = cpu["postgres_s"] / turns * 1000
            summary["redis_cpu_per_turn_ms"] = cpu["redis_s"] / turns * 1000
        if spy is not None:
            summary["profile"] = self.finish_profiler(spy)
        return summary

    def stream_level(self, fake, level, variant=None):
        """`level` concurrent slow streams on a fresh one-worker service (this tree's, or `variant`'s)."""
        name = f"service-streams-{level}" if variant is None else f"service-streams-{level}-{slug(variant.label)}"
        service = self.service(name, 1, fake.url, variant)
        try:
            service.warm_up(self.tokens)
            worker = service.workers()[0]
            time.sleep(0.5)
            rss_before = rss_kb(worker)
            ramp = min(12.0, max(1.0, level / STREAM_OPEN_RATE))
            start_at = time.monotonic() + 2.0
            stream_seconds = (STREAM_CHUNKS - 1) * STREAM_CHUNK_DELAY
            deadline = start_at + ramp + stream_seconds + 40
            configs = [{"mode": "streams", "service_url": service.url, "tokens": self.tokens,
                        "prefix": f"streams-{level}-{uuid_hex()}", "first": n, "stride": CLIENT_PROCESSES,
                        "total": level, "start_at": start_at, "ramp": ramp, "expect_chunks": STREAM_CHUNKS,
                        "timeout": 30, "deadline": deadline} for n in range(CLIENT_PROCESSES)]
            clients = Clients(self.processes, self.work_dir, f"streams-{level}", configs)
            watch = CpuWatch(self.database_name, [worker], fake.process.pid, clients.pids(),
                             master=service.process.pid)
            before = watch.snapshot()
            rss_peak, samples = rss_before, []
            while clients.running() and time.monotonic() < deadline + 10:
                rss = rss_kb(worker)
                samples.append((round(time.monotonic() - start_at, 2), rss, cpu_ticks([worker]).get(worker, 0)))
                rss_peak = max(rss_peak, rss)
                time.sleep(0.2)
            after = watch.snapshot()
            results = clients.collect(30)
        finally:
            service.stop()
        cpu = CpuWatch.between(before, after, clients_s=sum(r["client_cpu_s"] for r in results))
        failures = {}
        for result in results:
            for key, count in result["failures"].items():
                failures[key] = failures.get(key, 0) + count
        gaps = [gap for r in results for gap in r["gaps_ms"]]
        intervals = [interval for r in results for interval in r["intervals"]]
        summary = {
            "level": level, "ramp_s": ramp, "failed": sum(failures.values()), "failures": failures,
            "peak_concurrent": peak_concurrency(intervals),
            "gap_p50_ms": percentile(gaps, 50), "gap_p95_ms": percentile(gaps, 95),
            "gap_p99_ms": percentile(gaps, 99), "gap_max_ms": max(gaps) if gaps else float("nan"),
            "first_chunk_p50_ms": percentile([ms for r in results for ms in r["first_ms"]], 50),
            "first_chunk_p95_ms": percentile([ms for r in results for ms in r["first_ms"]], 95),
            "rss_before_kb": rss_before, "rss_peak_kb": rss_peak,
            "rss_per_stream_kb": (rss_peak - rss_before) / level,
            "worker_cpu_s": cpu["worker_total_s"], "worker_busy_cores": cpu["worker_total_s"] / cpu["wall_s"],
            "fake_cpu_s": cpu["fake_s"], "clients_cpu_s": cpu["clients_s"],
            "postgres_cpu_s": cpu["postgres_s"], "redis_cpu_s": cpu["redis_s"],
            "machine_busy_cores": cpu["machine_busy_cores"], "other_busy_cores": cpu["other_busy_cores"],
            "wall_s": cpu["wall_s"],
            # The worker's busiest second: 1.0 means it was CPU-bound then.
            "worker_peak_busy_cores": peak_busy(samples),
            "rss_samples": [sample[:2] for sample in samples[::5]],
        }
        limit = STREAM_CHUNK_DELAY * 1000 + GAP_SLACK_MS
        summary["clean"] = summary["failed"] == 0 and bool(gaps) and summary["gap_p95_ms"] <= limit
        return summary

    def start_profiler(self, pid, seconds, raw_name="profile-raw.txt"):
        """py-spy sampling the worker for `seconds` into `raw_name`, or None if py-spy is not installed."""
        spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
        if spy is None:
            self.notes.append("--profile: py-spy is not installed (pip install py-spy); no profile taken")
            return None
        raw = os.path.join(self.out, raw_name)
        with contextlib.suppress(FileNotFoundError):
            os.remove(raw)
        argv = [spy, "record", "--nonblocking", "-r", "200", "-d", str(max(1, round(seconds))), "-p", str(pid),
                "-f", "raw", "-o", raw]
        return self.processes.start("py-spy", argv), raw

    def finish_profiler(self, spy):
        """Wait for py-spy and summarise its samples."""
        process, raw = spy
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            pass
        self.processes.stop(process)
        if not os.path.exists(raw):
            self.notes.append(f"--profile: py-spy wrote nothing:\n{self.processes.log_tail('py-spy')}")
            return None
        return summarise_profile(raw)

    def relay(self, fake, service=None, profile=False):
        """Concurrent streams of the paced model, straight from it or (given a service) through one worker.

        The CPU of every part is sampled all along; relay_summary() keeps the window in which every
        stream was relaying. With `profile`, py-spy samples the worker while every stream relays.
        """
        streams, chunks = self.settings["relay_streams"], self.settings["relay_chunks"]
        target = "direct" if service is None else "service"
        label = target if service is None else service.variant.label
        ramp = streams / RELAY_OPEN_RATE
        start_at = time.monotonic() + 2.0
        deadline = start_at + ramp + RELAY_FIRST_CHUNK_DELAY + chunks * RELAY_CHUNK_DELAY + 30
        configs = [{"mode": "relay", "target": target, "service_url": service and service.url,
                    "upstream_url": fake.url, "model": MODEL, "tokens": self.tokens,
                    "prefix": f"relay-{uuid_hex()}", "first": n, "stride": CLIENT_PROCESSES, "total": streams,
                    "start_at": start_at, "ramp": ramp, "expect_chunks": chunks, "timeout": 30,
                    "deadline": deadline} for n in range(CLIENT_PROCESSES)]
        clients = Clients(self.processes, self.work_dir, f"relay-{target}", configs)
        watch = CpuWatch(self.database_name, service.workers() if service else [], fake.process.pid,
                         clients.pids(), master=service and service.process.pid)
        samples = [watch.snapshot()]
        relaying_from = start_at + ramp + RELAY_FIRST_CHUNK_DELAY + 0.3
        spy = None
        while clients.running() and time.monotonic() < deadline + 10:
            time.sleep(SAMPLE_INTERVAL)
            samples.append(watch.snapshot())
            if profile and spy is None and time.monotonic() >= relaying_from:
                spy = self.start_profiler(service.workers()[0], max(1, chunks * RELAY_CHUNK_DELAY * 0.7),
                                          "profile-relay-raw.txt") or False
        summary = relay_summary(clients.collect(30), samples, RELAY_CHUNK_DELAY)
        if spy:
            summary["profile"] = self.finish_profiler(spy)
        if summary["failed"]:
            self.notes.append(f"relay ({label}): {summary['failed']} streams failed: {summary['failures']}")
        if not summary["window_chunks"]:
            self.notes.append(f"relay ({label}): the streams were never all relaying at once")
        elif summary["schedule_share"] < 0.95 or summary["batched_share"] > 0.1:
            self.notes.append(
                f"relay ({label}): the clients received {summary['schedule_share']:.0%} of the scheduled chunks "
                f"in the window, and {summary['batched_share']:.0%} of all chunks in the same read as the one "
                "before: the model, the service or the clients fell behind (see the cores busy), so chunks went "
                "through in batches, which costs less CPU per chunk than one at a time and adds lateness")
        return summary

    # the whole run

    def service(self, name, workers, llm_url, variant=None):
        """Start the service (this tree's, or a variant's); the first one started tells the worker's limit on
        open files."""
        service = Service(self.processes, name, self, workers, llm_url, variant or self.main)
        self.results["settings"].setdefault("worker_open_files_limit", open_files_limit(service.workers()[0]))
        return service

    def run(self):
        """The phases asked for, in order; the results."""
        started = time.monotonic()
        log(f"preparing {self.database_url} and {self.redis_url}")
        self.prepare_stores()
        whole = CpuWatch(self.database_name)
        run_before = whole.snapshot()
        self.results["phases_run"] = list(self.phases) + (["profile"] if self.args.profile else [])
        self.results["settings"] = {
            **self.settings, "client_processes": CLIENT_PROCESSES, "users": USERS,
            "stream_chunk_delay_s": STREAM_CHUNK_DELAY, "stream_chunks": STREAM_CHUNKS,
            "stream_gap_limit_ms": STREAM_CHUNK_DELAY * 1000 + GAP_SLACK_MS,
            "stream_open_rate_per_s": STREAM_OPEN_RATE, "relay_chunk_delay_s": RELAY_CHUNK_DELAY,
            "relay_open_rate_per_s": RELAY_OPEN_RATE, "relay_first_chunk_delay_s": RELAY_FIRST_CHUNK_DELAY,
            "sample_interval_s": SAMPLE_INTERVAL,
            "database_url": self.database_url, "redis_url": self.redis_url,
        }
        if {"latency", "turns"} & set(self.phases) or self.args.profile:
            self.instant_phases()
        if "streams" in self.phases:
            self.stream_phases()
        if "relay" in self.phases:
            self.relay_phases()
        if "resume" in self.phases:
            self.resume_phase()
        if "turns" in self.phases:
            self.results["phases"]["metrics_cost"] = metrics_cost()
        run_after = whole.snapshot()
        self.results["phases"]["whole_run"] = {
            k: v for k, v in CpuWatch.between(run_before, run_after).items()
            if k in ("wall_s", "postgres_s", "redis_s", "machine_busy_cores")}
        self.results["duration_s"] = time.monotonic() - started
        return self.report()

    def instant_phases(self):
        """Latency, CPU per turn, scaling and the profile, against a model that answers at once."""
        phases = self.results["phases"]
        log("starting the instant fake model")
        instant = FakeModel(self.processes, "fake-instant", "--reply", INSTANT_REPLY)
        if "latency" in self.phases or "turns" in self.phases:
            self.one_worker_phases(instant)

        if "turns" in self.phases:
            service = self.service("service-2-workers", 2, instant.url)
            service.warm_up(self.tokens, turns=40)
            log(f"scaling: {self.settings['connections']} connections, 2 workers")
            phases["turns_2"] = self.turns(service, instant, "turns-2-workers")
            service.stop()

        if self.args.profile:
            service = self.service("service-profile", 1, instant.url)
            service.warm_up(self.tokens)
            log(f"profile: py-spy on the worker for {self.settings['profile_seconds']} s of turns")
            phases["profile"] = self.turns(service, instant, "turns-profile",
                                           profile_seconds=self.settings["profile_seconds"])
            service.stop()
        instant.stop()

    def one_worker_phases(self, instant):
        """Latency, then CPU per turn, of this tree and of each variant compared in them, each on a one-worker
        service of its own; the CPU windows taken in turn, round after round, so that the machine's drift
        falls on all of them alike, and the median round of each kept."""
        compared = {variant.label: variant for phase in ("latency", "turns") for variant in self.compared_in(phase)}
        running = [(self.main, self.service("service-1-worker", 1, instant.url))]
        running += [(variant, self.service(f"service-{slug(variant.label)}", 1, instant.url, variant))
                    for variant in compared.values()]
        rounds = {variant.label: [] for variant, _ in running}
        for variant, service in running:
            service.warm_up(self.tokens)
            if "latency" in self.phases and (variant is self.main or variant in self.compared_in("latency")):
                log(f"latency, {variant.label}: {self.settings['latency_n']} streamed turns, then /chat/run")
                self.measured(variant)["ttft"] = self.latency(service, instant, "stream")
                self.measured(variant)["run"] = self.latency(service, instant, "run")
        timed = [(variant, service) for variant, service in running
                 if "turns" in self.phases and (variant is self.main or variant in self.compared_in("turns"))]
        for number in range(self.settings["turns_rounds"]):
            shift = number % len(timed) if timed else 0  # each round begins with another: no place is always first
            for variant, service in timed[shift:] + timed[:shift]:
                log(f"CPU per turn, {variant.label}, round {number + 1}: {self.settings['connections']} connections")
                rounds[variant.label].append(self.turns(service, instant, f"turns-{slug(variant.label)}"))
        for variant, _ in timed:
            ordered = sorted(rounds[variant.label], key=lambda phase: phase["worker_cpu_per_turn_ms"])
            median = ordered[len(ordered) // 2]
            median["rounds_cpu_per_turn_ms"] = [phase["worker_cpu_per_turn_ms"] for phase in rounds[variant.label]]
            self.measured(variant)["turns_1"] = median
        for _, service in running:
            service.stop()

    def measured(self, variant):
        """Where a variant's figures go: this tree's phases, or its entry among the variants."""
        phases = self.results["phases"]
        return phases if variant is self.main else phases.setdefault("variants", {}).setdefault(variant.label, {})

    def stream_phases(self):
        """Open streams of a slow model, level by level, until a level is not clean."""
        log("starting the slow fake model (a chunk every 500 ms for 20 s)")
        slow = FakeModel(self.processes, "fake-slow", "--chunk-delay", str(STREAM_CHUNK_DELAY),
                         "--chunks", str(STREAM_CHUNKS))
        levels = []
        for level in self.settings["levels"]:
            log(f"open streams: {level} concurrent streams on one worker")
            summary = self.stream_level(slow, level)
            levels.append(summary)
            log(f"  {level}: failed {summary['failed']}, gap p95 {summary['gap_p95_ms']:.0f} ms, "
                f"peak {summary['peak_concurrent']} open, RSS +{summary['rss_per_stream_kb']:.1f} KB/stream")
            if not summary["clean"]:
                break
        self.results["phases"]["streams"] = levels
        for variant in self.compared_in("streams"):  # at the level this tree stopped at
            level = levels[-1]["level"]
            log(f"open streams, {variant.label}: {level} concurrent streams on one worker")
            self.measured(variant)["streams"] = self.stream_level(slow, level, variant)
        slow.stop()

    def relay_phases(self):
        """The same streams of a paced model straight from it, then through one worker."""
        streams, chunks = self.settings["relay_streams"], self.settings["relay_chunks"]
        log(f"starting the paced fake model ({chunks} chunks {RELAY_CHUNK_DELAY * 1000:.0f} ms apart)")
        paced = FakeModel(self.processes, "fake-relay", "--paced", "--chunks", str(chunks),
                          "--chunk-delay", str(RELAY_CHUNK_DELAY), "--first-chunk-delay", str(RELAY_FIRST_CHUNK_DELAY))
        log(f"relay: {streams} streams straight from the model")
        direct = self.relay(paced)
        service = self.service("service-relay", 1, paced.url)
        service.warm_up(self.tokens)
        log(f"relay: {streams} streams through one worker")
        through = self.relay(paced, service, profile=self.args.profile)
        service.stop()
        for variant in self.compared_in("relay"):
            other = self.service(f"service-relay-{slug(variant.label)}", 1, paced.url, variant)
            other.warm_up(self.tokens)
            log(f"relay, {variant.label}: {streams} streams through one worker")
            measured = self.results["phases"].setdefault("variants", {}).setdefault(variant.label, {})
            measured["relay"] = {"streams": streams, "chunks": chunks, "direct": direct,
                                 "service": self.relay(paced, other)}
            other.stop()
        paced.stop()
        log(f"  worker CPU {through['worker_cpu_per_chunk_us']:.1f} µs per relayed chunk "
            f"({through['window_chunks']} chunks in {through['window_s']:.2f} s); chunk lateness p99 "
            f"{direct['lateness_p99_ms']:.1f} ms direct, {through['lateness_p99_ms']:.1f} ms through the service")
        self.results["phases"]["relay"] = {"streams": streams, "chunks": chunks, "direct": direct, "service": through}

    def resume_phase(self):
        """Time to resume: a stream dropped after a few events, resumed with Last-Event-ID on the instance that
        runs it (from the process's own copy) and on another one (from the journal in Redis)."""
        n = self.settings["resume_n"]
        log(f"resume: {n} streams dropped and resumed, on the same instance and on another")
        paced = FakeModel(self.processes, "fake-resume", "--paced", "--chunks", "60",
                          "--chunk-delay", str(RELAY_CHUNK_DELAY))
        first = self.service("service-resume-1", 1, paced.url)
        second = self.service("service-resume-2", 1, paced.url)
        for service in (first, second):
            service.warm_up(self.tokens)
        times = {"same_instance": [], "other_instance": []}
        for k in range(n):
            where = "same_instance" if k % 2 else "other_instance"
            resumed_on = first if where == "same_instance" else second
            elapsed = time_to_resume(first, resumed_on, self.tokens[k % len(self.tokens)], f"resume-{uuid_hex()}")
            if elapsed is None:
                self.notes.append(f"resume ({where}): a resume got no event")
            else:
                times[where].append(elapsed)
        for service in (first, second):
            service.stop()
        paced.stop()
        self.results["phases"]["resume"] = {
            where: {"n": len(ms), "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95)}
            for where, ms in times.items()}
        log(f"  time to the first replayed event p50: {percentile(times['same_instance'], 50):.2f} ms on the same "
            f"instance, {percentile(times['other_instance'], 50):.2f} ms on another")

    def note_noise(self):
        """A note naming the phases during which other processes kept the cores busy."""
        phases = self.results["phases"]
        busy = [(name, phases[key]) for name, key in (("latency (streamed)", "ttft"), ("latency (/chat/run)", "run"),
                                                      ("CPU, 1 worker", "turns_1"), ("scaling, 2 workers", "turns_2"))
                if key in phases]
        busy += [(f"{level['level']} streams", level) for level in phases.get("streams", [])]
        if "relay" in phases:
            busy += [(f"relay, {side}", phases["relay"][side]) for side in ("direct", "service")]
        noisy = [f"{name} {phase['other_busy_cores']:.2f}" for name, phase in busy
                 if phase["other_busy_cores"] > NOISE_CORES]
        if noisy:
            self.notes.append("other processes on this machine kept cores busy during some phases, so those "
                              f"figures are noisier (cores busy outside the benchmark): {', '.join(noisy)}")

    def figure(self, key, name, value, unit, target=None, op=None):
        """Report a figure, against its target if it has one."""
        value = float(value)
        if not math.isfinite(value):
            # Nothing was measured (every request failed): no number, and the run fails.
            self.notes.append(f"{name}: nothing measured")
            value = None
        ok = None
        if op is not None:
            ok = value is not None and (value <= target if op == "<=" else value >= target)
        self.figures[key] = {"figure": name, "value": None if value is None else round(value, 3), "unit": unit,
                             "target": None if op is None else f"{op} {target:g}", "pass": ok}

    def report(self):
        """The figures of the phases that ran, against their targets, and everything around them."""
        phases = self.results["phases"]
        self.note_noise()
        if "ttft" in phases:
            self.latency_figures(phases["ttft"], phases["run"])
        if "streams" in phases:
            self.stream_figures(phases["streams"])
        if "turns_1" in phases:
            self.turn_figures(phases["turns_1"], phases["turns_2"])
        if "relay" in phases:
            self.relay_figures(phases["relay"])
        if "resume" in phases:
            self.resume_figures(phases["resume"])
        if "variants" in phases:
            self.variant_figures(phases, phases["variants"])
        if "metrics_cost" in phases:
            self.metrics_figures(phases["metrics_cost"], phases.get("turns_1"))
        self.figure("postgres_cpu_s_run", "PostgreSQL CPU over the whole run (context)",
                    phases["whole_run"]["postgres_s"], "s")
        self.figure("redis_cpu_s_run", "Redis CPU over the whole run (context)", phases["whole_run"]["redis_s"], "s")
        self.results.update({
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "mode": "quick" if self.args.quick else "full",
            "command": " ".join([sys.executable] + sys.argv),
            "machine": machine(),
            "figures": self.figures,
            "notes": self.notes,
        })
        return self.results

    def latency_figures(self, ttft, run):
        """Added time to first token and added total time of /chat/run."""
        for q, target in ((50, 1.5), (95, None), (99, 3)):
            self.figure(f"ttft_added_p{q}_ms", f"added time to first token p{q}", ttft[f"added_p{q}_ms"], "ms",
                        target, "<=" if target else None)
        for side in ("direct", "service"):
            for q in (50, 95, 99):
                self.figure(f"ttft_{side}_p{q}_ms", f"time to first token p{q}, {side}", ttft[f"{side}_p{q}_ms"],
                            "ms")
        for q in (50, 95):
            self.figure(f"run_added_p{q}_ms", f"added total time of /chat/run p{q}", run[f"added_p{q}_ms"], "ms")
        for side in ("direct", "service"):
            for q in (50, 95):
                self.figure(f"run_{side}_p{q}_ms", f"total time p{q}, {side}", run[f"{side}_p{q}_ms"], "ms")

    def stream_figures(self, levels):
        """Open streams one worker carries, and memory per stream."""
        clean = [level for level in levels if level["clean"]]
        carried = clean[-1] if clean else None
        measured = carried or levels[0]
        if carried is None:
            self.notes.append(f"no stream level was clean; memory per stream is from the {levels[0]['level']} level")
        self.figure("open_streams_per_worker", "open streams one worker carries (largest clean level)",
                    carried["level"] if carried else 0, "streams", 3000, ">=")
        self.figure("streams_failed", "streams failed at that level",
                    carried["failed"] if carried else levels[0]["failed"], "streams", 0, "<=")
        self.figure("stream_gap_p95_ms", "chunk gap p95 at that level (upstream: 500 ms)",
                    measured["gap_p95_ms"], "ms", STREAM_CHUNK_DELAY * 1000 + GAP_SLACK_MS, "<=")
        self.figure("memory_per_stream_kb", "memory per open stream", measured["rss_per_stream_kb"], "KB", 60, "<=")

    def turn_figures(self, one, two):
        """CPU per turn, turns per second with 1 and 2 workers, and what shares the cores with them."""
        self.figure("cpu_per_turn_ms", "worker CPU per turn (1 worker, default settings)",
                    one["worker_cpu_per_turn_ms"], "ms", 1.2, "<=")
        self.figure("turns_per_s_1_worker", "turns per second, 1 worker", one["turns_per_s"], "turns/s")
        self.figure("turns_per_s_2_workers", "turns per second, 2 workers", two["turns_per_s"], "turns/s")
        self.figure("scaling_ratio", "scaling, 2 workers / 1 worker",
                    two["turns_per_s"] / one["turns_per_s"] if one["turns_per_s"] else float("nan"), "x", 1.7, ">=")
        helpers = helpers_cpu_per_turn_ms(one)
        self.figure("helpers_cpu_per_turn_ms", "CPU per turn of everything else on the machine (context)",
                    helpers, "ms")
        self.figure("scaling_ceiling", "highest scaling these cores allow (context)",
                    scaling_ceiling(one, helpers, machine()["nproc"]), "x")
        self.figure("postgres_cpu_per_turn_ms", "PostgreSQL CPU per turn (context)",
                    one.get("postgres_cpu_per_turn_ms", float("nan")), "ms")
        self.figure("redis_cpu_per_turn_ms", "Redis CPU per turn (context)",
                    one.get("redis_cpu_per_turn_ms", float("nan")), "ms")

    def variant_figures(self, phases, variants):
        """How each variant compares with this tree: metrics off, a larger pool, earlier revisions."""
        for label, measured in variants.items():
            key = slug(label).replace("-", "_")
            if "turns_1" in measured and "turns_1" in phases:
                mine, theirs = phases["turns_1"]["worker_cpu_per_turn_ms"], measured["turns_1"]["worker_cpu_per_turn_ms"]
                self.figure(f"cpu_per_turn_ms_{key}", f"worker CPU per turn, {label} (context)", theirs, "ms")
                if label == "METRICS=off":
                    self.figure("metrics_cpu_share_ab", "CPU per turn with metrics on over off, A/B of whole turns "
                                "(context: noisier than the in-process figure)", (mine / theirs - 1) * 100, "%")
            if "ttft" in measured and "ttft" in phases:
                for q in (50, 99):
                    self.figure(f"ttft_added_p{q}_ms_{key}", f"added time to first token p{q}, {label} (context)",
                                measured["ttft"][f"added_p{q}_ms"], "ms")
            if "streams" in measured and "streams" in phases:
                level = measured["streams"]
                self.figure(f"streams_failed_{key}", f"streams failed, {label}, {level['level']} streams (context)",
                            level["failed"], "streams")
                self.figure(f"stream_gap_p95_ms_{key}", f"chunk gap p95, {label}, {level['level']} streams (context)",
                            level["gap_p95_ms"], "ms")
            if "relay" in measured and "relay" in phases:
                mine = phases["relay"]["service"]["worker_cpu_per_chunk_us"]
                theirs = measured["relay"]["service"]["worker_cpu_per_chunk_us"]
                self.figure(f"relay_cpu_per_chunk_us_{key}", f"worker CPU per relayed chunk, {label} (context)",
                            theirs, "µs")
                self.figure(f"relay_cpu_change_{key}", f"worker CPU per relayed chunk, this tree against {label}",
                            (mine / theirs - 1) * 100, "%")

    def metrics_figures(self, cost, turns):
        """What counting for Prometheus costs a turn, timed in-process, against the worker's CPU per turn."""
        self.figure("metrics_cpu_per_turn_us", "metrics CPU per /chat/run turn (the meter's calls, in-process)",
                    cost["run_us"], "µs")
        self.figure("metrics_cpu_per_stream_us", "metrics CPU per streamed turn (the meter's calls, in-process)",
                    cost["stream_us"], "µs")
        if turns and turns["worker_cpu_per_turn_ms"]:
            self.figure("metrics_cpu_share", "metrics' share of the worker's CPU per /chat/run turn",
                        cost["run_us"] / (turns["worker_cpu_per_turn_ms"] * 1000) * 100, "%", 3, "<=")

    def resume_figures(self, resume):
        """Time from GET /chat/stream/{id} to the first replayed event."""
        for where, name in (("same_instance", "the instance running the turn"),
                            ("other_instance", "another instance (from Redis)")):
            for q in (50, 95):
                self.figure(f"resume_{where}_p{q}_ms", f"time to resume p{q}, on {name}", resume[where][f"p{q}_ms"],
                            "ms")

    def relay_figures(self, relay):
        """Worker CPU per relayed chunk, and the delay the service adds to each chunk."""
        direct, service = relay["direct"], relay["service"]
        shape = f"{relay['streams']} streams × {relay['chunks']} chunks, {RELAY_CHUNK_DELAY * 1000:.0f} ms apart"
        self.figure("relay_cpu_per_chunk_us", f"worker CPU per relayed chunk ({shape})",
                    service["worker_cpu_per_chunk_us"], "µs", 35, "<=")
        self.figure("relay_chunks_in_window", "chunks relayed in the window CPU was measured over",
                    service["window_chunks"], "chunks")
        self.figure("relay_cpu_per_chunk_whole_us",
                    "worker CPU per chunk over the whole streams, setting up and saving included (context)",
                    service["worker_cpu_per_chunk_whole_us"], "µs")
        self.figure("relay_streams_failed", "relayed streams failed (direct and through the service)",
                    direct["failed"] + service["failed"], "streams")
        for q, target in ((50, None), (99, 5)):
            self.figure(f"relay_delay_added_p{q}_ms", f"added chunk delay p{q} (lateness, service − direct)",
                        service[f"lateness_p{q}_ms"] - direct[f"lateness_p{q}_ms"], "ms",
                        target, "<=" if target else None)
        for side, phase in (("direct", direct), ("service", service)):
            for q in (50, 99):
                self.figure(f"relay_delay_{side}_p{q}_ms", f"chunk lateness p{q}, {side}", phase[f"lateness_p{q}_ms"],
                            "ms")
        self.figure("relay_fake_cpu_per_chunk_us", "fake model CPU per chunk, through the service (context)",
                    service["fake_cpu_per_chunk_us"], "µs")
        self.figure("relay_clients_cpu_per_chunk_us", "clients' CPU per chunk, through the service (context)",
                    service["clients_cpu_per_chunk_us"], "µs")


METER_TIMING = """
import json, sys, tempfile, time, os
os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="chat-bench-metrics-")
sys.path.insert(0, os.getcwd())
from metrics import Meter
meter, n = Meter(), int(sys.argv[1])

def run_turn():
    meter.turn("run", "complete", 0.004, None, "bench-model", 40, 12)
    meter.request("/chat/run", "POST", 200)

def stream_turn():
    meter.stream_opened()
    meter.turn("stream", "complete", 0.03, 0.002, "bench-model", 40, 12)
    meter.stream_closed()
    meter.request("/chat/stream", "POST", 200)

figures = {}
for name, turn in (("run_us", run_turn), ("stream_us", stream_turn)):
    for _ in range(1000):
        turn()
    started = time.process_time()
    for _ in range(n):
        turn()
    figures[name] = (time.process_time() - started) / n * 1e6
print(json.dumps(figures))
"""


def metrics_cost(n=20000):
    """CPU µs the meter's calls cost one /chat/run turn and one streamed turn, in multiprocess mode as under
    gunicorn, timed in a process of their own."""
    done = subprocess.run([sys.executable, "-c", METER_TIMING, str(n)], cwd=ROOT, check=True, capture_output=True,
                          text=True, timeout=120)
    return json.loads(done.stdout)


def relay_summary(results, samples, delay):
    """What one relay run measured: its failures, how late and how far apart the chunks came, and each
    part's CPU per chunk over the window in which every stream was relaying."""
    failures = {}
    for result in results:
        for key, count in result["failures"].items():
            failures[key] = failures.get(key, 0) + count
    streams = [stream for result in results for stream in result["arrivals"]]
    late = [ms for stream in streams for ms in lateness_ms(stream, delay)]
    gaps = [(later - earlier) * 1000 for stream in streams for earlier, later in zip(stream, stream[1:])]
    summary = {"complete": len(streams), "failed": sum(failures.values()), "failures": failures,
               "chunks_received": sum(map(len, streams)),
               "lateness_p50_ms": percentile(late, 50), "lateness_p99_ms": percentile(late, 99),
               "lateness_max_ms": max(late, default=float("nan")),
               "gap_p50_ms": percentile(gaps, 50), "gap_p99_ms": percentile(gaps, 99),
               # How far apart the streams started relaying: the window is the stream's length less this.
               "first_chunk_spread_s": (max(stream[0] for stream in streams) - min(stream[0] for stream in streams)
                                        if streams else float("nan")),
               # Chunks read together with the one before them: someone on the way fell behind.
               "batched_share": sum(gap == 0 for gap in gaps) / len(gaps) if gaps else float("nan")}
    summary.update(relaying_cpu(streams, samples))
    # The whole run of the streams, setting them up and saving them included, for comparison.
    whole = CpuWatch.between(samples[0], samples[-1])
    summary["worker_cpu_per_chunk_whole_us"] = (whole["worker_total_s"] / summary["chunks_received"] * 1e6
                                                if summary["chunks_received"] else float("nan"))
    scheduled = summary["window_s"] * len(streams) / delay
    summary["schedule_share"] = summary["window_chunks"] / scheduled if scheduled else float("nan")
    return summary


def lateness_ms(arrivals, delay):
    """How late each chunk of a stream came (ms) against one chunk every `delay` s, the schedule set by
    the stream's least late chunk: what was added on the way beyond the stream's best transit time."""
    origin = min(at - k * delay for k, at in enumerate(arrivals))
    return [(at - k * delay - origin) * 1000 for k, at in enumerate(arrivals)]


def relaying_cpu(streams, samples):
    """Each part's CPU per chunk between the first and the last sample taken while every stream was
    relaying (its first chunk in, its last not yet), with the chunks the clients received in between."""
    opened = max((stream[0] for stream in streams), default=float("nan"))
    closing = min((stream[-1] for stream in streams), default=float("nan"))
    inside = [sample for sample in samples if opened <= sample["at"] <= closing] or samples[:1]
    before, after = inside[0], inside[-1]
    chunks = sum(before["at"] < at <= after["at"] for stream in streams for at in stream)
    cpu = CpuWatch.between(before, after)

    def per_chunk(seconds):
        return seconds / chunks * 1e6 if chunks else float("nan")

    return {"window_s": cpu["wall_s"], "window_chunks": chunks,
            "worker_cpu_s": cpu["worker_total_s"], "worker_cpu_per_chunk_us": per_chunk(cpu["worker_total_s"]),
            "worker_busy_cores": cpu["worker_total_s"] / cpu["wall_s"] if cpu["wall_s"] else float("nan"),
            "fake_cpu_s": cpu["fake_s"], "fake_cpu_per_chunk_us": per_chunk(cpu["fake_s"]),
            "clients_cpu_s": cpu["clients_s"], "clients_cpu_per_chunk_us": per_chunk(cpu["clients_s"]),
            "postgres_cpu_s": cpu["postgres_s"], "redis_cpu_s": cpu["redis_s"],
            "machine_busy_cores": cpu["machine_busy_cores"], "other_busy_cores": cpu["other_busy_cores"]}


def helpers_cpu_per_turn_ms(phase):
    """CPU per turn, in the 1-worker phase, of what shares the cores with the workers: the fake
    model, the load generators, PostgreSQL and Redis."""
    if not phase["turns"]:
        return float("nan")
    spent = phase["fake_cpu_s"] + phase["clients_cpu_s"] + phase["postgres_cpu_s"] + phase["redis_cpu_s"]
    return spent / phase["turns"] * 1000


def scaling_ceiling(phase, helpers_ms, cores):
    """The most that 2 workers can multiply the 1-worker turns per second by on `cores` cores.

    Each turn needs the worker's CPU (w) and the helpers' (h) from the same cores, so two
    workers finish at most cores / (w + h) turns a second, and at most 2 / w.
    """
    worker_ms = phase["worker_cpu_per_turn_ms"]
    if not phase["turns_per_s"] or not math.isfinite(helpers_ms) or not worker_ms:
        return float("nan")
    most = min(cores / (worker_ms + helpers_ms), 2 / worker_ms) * 1000
    return most / phase["turns_per_s"]


def time_to_resume(service, resumed_on, token, conversation_id):
    """Start a stream on `service`, drop it after three events, resume it 300 ms later on `resumed_on` with the
    last event's id: milliseconds from sending the GET to the first replayed event (None if none came)."""
    headers = {"Authorization": f"Bearer {token}"}
    last_id = None
    with requests.post(service.url + "/chat/stream", json={"message": "resume me", "conversation_id": conversation_id},
                       headers=headers, stream=True, timeout=30) as response:
        seen = 0
        for line in response.iter_lines():
            if line.startswith(b"id: "):
                last_id, seen = line[4:].decode(), seen + 1
            if seen == 3:
                break
    time.sleep(0.3)  # events go on meanwhile: the resume has missed ones to replay
    started = time.perf_counter()
    with requests.get(f"{resumed_on.url}/chat/stream/{conversation_id}", stream=True, timeout=30,
                      headers={**headers, "Last-Event-ID": last_id}) as resumed:
        for line in resumed.iter_lines():
            if line.startswith(b"data: "):
                return (time.perf_counter() - started) * 1000
    return None


def sleep_until(moment):
    """Sleep until time.monotonic() reaches `moment`."""
    time.sleep(max(0.0, moment - time.monotonic()))


def peak_busy(samples, window=1.0):
    """The highest CPU use (cores) over any `window` seconds of (time, rss, ticks) samples."""
    peak, start = 0.0, 0
    for end in range(len(samples)):
        while samples[end][0] - samples[start][0] > window:
            start += 1
        elapsed = samples[end][0] - samples[start][0]
        if elapsed >= window * 0.8:
            peak = max(peak, (samples[end][2] - samples[start][2]) / CLOCK_TICKS / elapsed)
    return peak


def peak_concurrency(intervals):
    """The most intervals [start, end] open at one moment."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    open_now = peak = 0
    for _, change in events:
        open_now += change
        peak = max(peak, open_now)
    return peak


def summarise_profile(raw_path, top=25):
    """py-spy's raw (collapsed) stacks summarised: top functions by self and by cumulative samples,
    self samples by package, and the service's own functions by cumulative samples."""
    self_samples, total_samples, packages, total = {}, {}, {}, 0
    with open(raw_path, errors="replace") as raw:
        for line in raw:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            count = int(count)
            frames = [function_of(frame) for frame in stack.split(";") if frame]
            if not frames:
                continue
            total += count
            self_samples[frames[-1]] = self_samples.get(frames[-1], 0) + count
            package = package_of(frames[-1])
            packages[package] = packages.get(package, 0) + count
            for frame in set(frames):
                total_samples[frame] = total_samples.get(frame, 0) + count

    def ranked(table, keep=lambda name: True, limit=top):
        rows = [(name, n) for name, n in sorted(table.items(), key=lambda item: -item[1]) if keep(name)]
        return [{"function": name, "samples": n, "percent": round(100 * n / total, 1) if total else 0.0}
                for name, n in rows[:limit]]

    return {"samples": total, "self": ranked(self_samples), "cumulative": ranked(total_samples),
            "self_by_package": ranked(packages, limit=len(packages)),
            "service_cumulative": ranked(total_samples, keep=lambda name: package_of(name) == "the service")}


def function_of(frame):
    """'name (file.py:12)' -> 'name (file.py)': a function, whatever its line."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


APP_MODULES = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")}


def package_of(function):
    """Which package a 'name (path/file.py)' function is in: 'the service', 'stdlib' or the package."""
    where = function.rpartition(" (")[2].rstrip(")")
    if where.startswith("<frozen"):
        return "stdlib"
    if ".py" not in where:
        return "(unreadable frame)"
    top = where.split("/", 1)[0].removesuffix(".py")
    if top in APP_MODULES and "/" not in where:
        return "the service"
    if top in sys.stdlib_module_names:
        return "stdlib"
    return top


def machine():
    """What ran the benchmark."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": len(os.sched_getaffinity(0)), "cpu_model": model, "python": platform.python_version(),
            "platform": platform.platform()}


def markdown(results):
    """The results as a Markdown document: the figures, then a section for each phase that ran."""
    m = results["machine"]
    lines = [f"# Chat API benchmark ({results['mode']})", "",
             f"- date: {results['date']}",
             f"- machine: {m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}, {m['platform']}",
             f"- command: `{results['command']}`",
             f"- phases: {', '.join(results.get('phases_run', PHASES))}",
             f"- duration: {results['duration_s']:.0f} s", "",
             "| figure | value | target | result |", "|---|---|---|---|"]
    for figure in results["figures"].values():
        verdict = "—" if figure["pass"] is None else ("pass" if figure["pass"] else "FAIL")
        value = "n/a" if figure["value"] is None else f"{figure['value']:g}"
        lines.append(f"| {figure['figure']} | {value} {figure['unit']} | "
                     f"{figure['target'] or '(report)'} | {verdict} |")
    phases = results["phases"]
    if results.get("settings"):
        lines += ["", "## How", ""] + how(results["settings"], phases)
    if "streams" in phases:
        lines += stream_table(phases["streams"])
    if any(key in phases for key in ("turns_1", "turns_2", "profile")):
        lines += turns_table(phases)
    if "ttft" in phases:
        lines += latency_table(phases["ttft"], phases["run"])
    if "relay" in phases:
        lines += relay_table(phases["relay"])
    if "variants" in phases:
        lines += variants_table(phases)
    whole = phases["whole_run"]
    lines += ["", (f"PostgreSQL used {whole['postgres_s']:.1f} s and Redis {whole['redis_s']:.1f} s of CPU over "
                   f"the {whole['wall_s']:.0f} s run (all their processes, from /proc; other users of the same "
                   "servers count too). None of it is counted as the worker's."), ""]
    profile = (phases.get("profile") or {}).get("profile")
    if profile:
        lines += profile_lists(profile, "one worker under /chat/run load")
    relay_profile = ((phases.get("relay") or {}).get("service") or {}).get("profile")
    if relay_profile:
        lines += profile_lists(relay_profile, "one worker relaying the streams")
    if results["notes"]:
        lines += ["## Notes", ""] + [f"- {note}" for note in results["notes"]] + [""]
    return "\n".join(lines)


def how(settings, phases):
    """How each phase that ran was measured, one bullet each."""
    lines = []
    if "ttft" in phases:
        lines.append(f"- Latency: {settings['latency_n']} requests each way (after {settings['latency_warmup']} "
                     "discarded), one at a time on keep-alive connections, direct to the fake model and through "
                     "the service (1 worker), interleaved; a new conversation per turn.")
    if "streams" in phases:
        lines.append(f"- Streams: a fake model sending {settings['stream_chunks']} chunks "
                     f"{settings['stream_chunk_delay_s'] * 1000:.0f} ms apart; a fresh one-worker service per level; "
                     f"streams opened at {settings['stream_open_rate_per_s']}/s by {settings['client_processes']} "
                     f"gevent client processes; a level is clean with no failure and a chunk-gap p95 of at most "
                     f"{settings['stream_gap_limit_ms']:.0f} ms. Levels: {settings['levels']}.")
    if "turns_1" in phases or "profile" in phases:
        lines.append(f"- CPU and scaling: an instant fake model; {settings['connections']} keep-alive client "
                     f"connections in {settings['client_processes']} processes, closed loop on /chat/run; "
                     f"{settings['turns_warmup']:g} s of warm-up, then a {settings['turns_seconds']:g} s window "
                     "over which /proc gives each process's utime+stime. With one worker, this tree and each "
                     f"variant are measured in turn, {settings.get('turns_rounds', 1)} rounds, and each one's "
                     "median round is kept.")
    if "relay" in phases:
        delay_ms = settings["relay_chunk_delay_s"] * 1000
        lines.append(f"- Relay: a paced fake model sending {settings['relay_chunks']} chunks {delay_ms:.0f} ms apart "
                     f"(chunk k due k × {delay_ms:.0f} ms after the first, which it holds "
                     f"{settings['relay_first_chunk_delay_s']:g} s so that every stream is open before any chunk "
                     f"flows); {settings['relay_streams']} streams opened at {settings['relay_open_rate_per_s']}/s "
                     f"by {settings['client_processes']} gevent client processes, first straight from the model, "
                     "then through /chat/stream on one worker, with the same client code. Every part's CPU is "
                     f"read every {settings['sample_interval_s'] * 1000:.0f} ms; the window runs from the first "
                     "reading after the last stream's first chunk to the last reading before the first stream's "
                     "last chunk, and CPU per chunk is a part's utime+stime over it divided by the content chunks "
                     "the clients received in it. A chunk's lateness is its arrival against its stream's "
                     f"{delay_ms:.0f} ms schedule, set by the stream's least late chunk; the added delay is the "
                     "service's lateness percentile minus the direct one.")
    lines.append(f"- The worker's limit on open files: {settings.get('worker_open_files_limit', 'n/a')}; "
                 "every other setting at its default (DATABASE_POOL_SIZE 10 connections per worker) but where a "
                 "variant names one. "
                 f"{settings['users']} users, a new conversation for every turn.")
    variants = phases.get("variants", {})
    if PLAIN_LABEL in variants or BARE_LABEL in variants:
        lines.append(f"- Two floors run beside this tree under gunicorn's own gevent worker, one worker each: "
                     f"{PLAIN_LABEL} (bench/floor/chat_app.py: the specification's two endpoints written plainly "
                     "with Flask, flask-jwt-extended, redis-py, Peewee and requests, with nothing of the product's "
                     f"own) and {BARE_LABEL} (bench/floor/bare.py: a WSGI function that checks the JWT, makes one "
                     "Redis round trip before the model and one after, one INSERT (in autocommit), and one recv, one "
                     "json.loads and one send a chunk). What the bare minimum spends a chunk, no relay on this stack "
                     "saves on this machine.")
    return lines


def stream_table(levels):
    """The open-streams levels, one row each."""
    lines = ["", "## Open streams, level by level (one worker, fresh for each level)", "",
             ("| streams | peak open | failed | gap p50 / p95 / p99 / max ms | first chunk p50 / p95 ms | "
              "RSS before → peak MB | KB/stream | worker cores busy (busiest second) | "
              "fake / clients / PostgreSQL CPU s | machine / other cores busy |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for level in levels:
        lines.append(
            f"| {level['level']} | {level['peak_concurrent']} | {level['failed']} {level['failures'] or ''} | "
            f"{level['gap_p50_ms']:.0f} / {level['gap_p95_ms']:.0f} / {level['gap_p99_ms']:.0f} / "
            f"{level['gap_max_ms']:.0f} | {level['first_chunk_p50_ms']:.0f} / {level['first_chunk_p95_ms']:.0f} | "
            f"{level['rss_before_kb'] / 1024:.1f} → {level['rss_peak_kb'] / 1024:.1f} | "
            f"{level['rss_per_stream_kb']:.1f} | {level['worker_busy_cores']:.2f} "
            f"({level['worker_peak_busy_cores']:.2f}) | "
            f"{level['fake_cpu_s']:.1f} / {level['clients_cpu_s']:.1f} / {level['postgres_cpu_s']:.1f} | "
            f"{level['machine_busy_cores']:.2f} / {level['other_busy_cores']:.2f} |")
    return lines


def turns_table(phases):
    """The closed-loop /chat/run phases, one row each."""
    lines = ["", "## Closed-loop /chat/run at saturation", "",
             ("| workers | turns/s | latency p50 / p95 ms | worker CPU per turn ms | worker cores busy "
              "(each worker's CPU s) | fake / clients CPU s | PostgreSQL / Redis CPU per turn ms | "
              "machine / other cores busy |"),
             "|---|---|---|---|---|---|---|---|"]
    for key in ("turns_1", "turns_2", "profile"):
        phase = phases.get(key)
        if not phase:
            continue
        each = ", ".join(f"{s:.1f}" for s in phase["worker_cpu_s_each"].values())
        lines.append(
            f"| {phase['workers']}{' (py-spy)' if key == 'profile' else ''} | {phase['turns_per_s']:.0f} | "
            f"{phase['latency_p50_ms']:.1f} / {phase['latency_p95_ms']:.1f} | "
            f"{phase['worker_cpu_per_turn_ms']:.2f} | {phase['worker_busy_cores']:.2f} ({each}) | "
            f"{phase['fake_cpu_s']:.1f} / {phase['clients_cpu_s']:.1f} | "
            f"{phase.get('postgres_cpu_per_turn_ms', float('nan')):.2f} / "
            f"{phase.get('redis_cpu_per_turn_ms', float('nan')):.2f} | "
            f"{phase['machine_busy_cores']:.2f} / {phase['other_busy_cores']:.2f} |")
    return lines


def latency_table(ttft, run):
    """Direct, through the service and added, for the streamed and the whole answer."""
    lines = ["", "## Latency, one request at a time (ms)", "",
             ("| request | n | direct p50 / p95 / p99 | service p50 / p95 / p99 | added p50 / p95 / p99 | "
              "paired difference p50 | machine / other cores busy |"), "|---|---|---|---|---|---|---|"]
    for name, phase in (("streamed, to first token", ttft), ("/chat/run, whole answer", run)):
        cells = [" / ".join(f"{phase[f'{side}_p{q}_ms']:.2f}" for q in (50, 95, 99))
                 for side in ("direct", "service", "added")]
        lines.append(f"| {name} | {phase['n']} | {' | '.join(cells)} | {phase['paired_difference_p50_ms']:.2f} | "
                     f"{phase['machine_busy_cores']:.2f} / {phase['other_busy_cores']:.2f} |")
    return lines


def relay_table(relay):
    """The relayed streams, straight from the model and through the service."""
    lines = ["", (f"## Relayed streams ({relay['streams']} streams × {relay['chunks']} chunks, "
                  f"{RELAY_CHUNK_DELAY * 1000:.0f} ms apart)"), "",
             ("| path | streams complete / failed | chunks received | window s | chunks in window (of scheduled) | "
              "worker CPU µs/chunk in the window (cores busy); over the whole streams | fake / clients CPU µs/chunk | "
              "chunk lateness p50 / p99 / max ms | "
              "gap p50 / p99 ms | read with the one before | machine / other cores busy |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for side in ("direct", "service"):
        phase = relay[side]
        worker = "—" if side == "direct" else (f"{phase['worker_cpu_per_chunk_us']:.1f} "
                                               f"({phase['worker_busy_cores']:.2f}); "
                                               f"{phase['worker_cpu_per_chunk_whole_us']:.1f}")
        lines.append(
            f"| {side} | {phase['complete']} / {phase['failed']} {phase['failures'] or ''} | "
            f"{phase['chunks_received']} | {phase['window_s']:.2f} | "
            f"{phase['window_chunks']} ({phase['schedule_share']:.0%}) | {worker} | "
            f"{phase['fake_cpu_per_chunk_us']:.1f} / {phase['clients_cpu_per_chunk_us']:.1f} | "
            f"{phase['lateness_p50_ms']:.2f} / {phase['lateness_p99_ms']:.2f} / {phase['lateness_max_ms']:.2f} | "
            f"{phase['gap_p50_ms']:.2f} / {phase['gap_p99_ms']:.2f} | {phase['batched_share']:.0%} | "
            f"{phase['machine_busy_cores']:.2f} / {phase['other_busy_cores']:.2f} |")
    return lines


def variants_table(phases):
    """This tree beside each variant, figure by figure, as measured in this run."""
    variants = phases["variants"]
    rows = (("added time to first token p50 / p99 ms", "ttft",
             lambda phase: f"{phase['added_p50_ms']:.2f} / {phase['added_p99_ms']:.2f}"),
            ("added total time of /chat/run p50 ms", "run", lambda phase: f"{phase['added_p50_ms']:.2f}"),
            ("worker CPU per turn ms, the median round (turns/s); every round", "turns_1",
             lambda phase: f"{phase['worker_cpu_per_turn_ms']:.3f} ({phase['turns_per_s']:.0f}); "
                           + " / ".join(f"{ms:.3f}" for ms in phase.get("rounds_cpu_per_turn_ms", []))),
            ("worker CPU per relayed chunk µs; added delay p99 ms", "relay",
             lambda phase: (f"{phase['service']['worker_cpu_per_chunk_us']:.1f}; "
                            f"{phase['service']['lateness_p99_ms'] - phase['direct']['lateness_p99_ms']:.2f}")),
            ("open streams (the level this tree stopped at): failed; chunk gap p95 ms", "streams",
             lambda phase: stream_cell(phase[-1] if isinstance(phase, list) else phase)))
    lines = ["", "## Side by side, in this run", "",
             "| figure | this tree | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for name, key, cell in rows:
        if key not in phases and not any(key in measured for measured in variants.values()):
            continue
        cells = [cell(phases[key]) if key in phases else "—"]
        cells += [cell(measured[key]) if key in measured else "—" for measured in variants.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def stream_cell(level):
    """A stream level's cell: how many streams, how many failed, the gap p95."""
    return f"{level['level']}: {level['failed']} failed; {level['gap_p95_ms']:.0f}"


def profile_lists(profile, what):
    """py-spy's summary: top functions by package, self and cumulative time."""
    lines = [f"## py-spy, {what} ({profile['samples']} samples)", ""]
    for kind, title in (("self_by_package", "Self time by package"), ("self", "Top functions by self time"),
                        ("cumulative", "Top functions by cumulative time"),
                        ("service_cumulative", "The service's own functions by cumulative time")):
        lines += [f"{title}:", "", "| % | function |", "|---|---|"]
        lines += [f"| {row['percent']} | `{row['function']}` |" for row in profile[kind]]
        lines.append("")
    return lines


def finite(value):
    """`value` with every NaN or infinity replaced by None, so the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def write(results, out):
    """results.json and results.md in `out`; the Markdown."""
    text = markdown(results)
    with open(os.path.join(out, "results.json"), "w") as data:
        json.dump(finite(results), data, indent=2, default=str)
    with open(os.path.join(out, "results.md"), "w") as document:
        document.write(text)
    return text


def phase_list(text):
    """The phases named in a comma-separated list, in the order they run."""
    named = {name.strip() for name in text.split(",") if name.strip()}
    if not named or named - set(PHASES):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of phases ({', '.join(PHASES)})")
    return [phase for phase in PHASES if phase in named]


def parse_args(argv=None):
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (under 90 s), as CI runs it")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"),
                        help="where results.md, results.json and logs/ go")
    parser.add_argument("--profile", action="store_true", help="also profile one worker with py-spy")
    parser.add_argument("--levels", help="comma-separated stream levels instead of the mode's")
    parser.add_argument("--phases", default=",".join(PHASES), type=phase_list,
                        help=f"comma-separated phases to run, of {', '.join(PHASES)} (default: all)")
    parser.add_argument("--database-url", default="postgresql://root@127.0.0.1:5432/chat_bench")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--against", action="append", default=[], metavar="REVISION",
                        help="also run the latency, turns and relay phases on the service as it was at this git "
                             "revision, side by side in the same run (repeatable)")
    return parser.parse_args(argv)


def main(argv=None):
    """Run the benchmark; exit status 0 unless something crashed."""
    args = parse_args(argv)
    raise_file_limit()
    # Ctrl-C (even where a shell started us with SIGINT ignored) and SIGTERM end the run through
    # the finally below, which stops every process.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    bench = Bench(args)
    try:
        results = bench.run()
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    finally:
        bench.close()
    print(write(results, bench.out))
    log(f"wrote {os.path.join(bench.out, 'results.md')} and results.json in {results['duration_s']:.0f} s")
    unmeasured = [key for key, figure in results["figures"].items() if figure["value"] is None]
    if unmeasured:
        log(f"not measured (something failed, see the notes and {bench.out}/logs): {', '.join(unmeasured)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
