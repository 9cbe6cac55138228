"""The benchmark (bench/run.py) runs end to end in quick mode and reports every figure."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.helpers import ROOT

FIGURES = {
    "ttft_added_p50_ms", "ttft_added_p95_ms", "ttft_added_p99_ms",
    "ttft_direct_p50_ms", "ttft_direct_p95_ms", "ttft_direct_p99_ms",
    "ttft_service_p50_ms", "ttft_service_p95_ms", "ttft_service_p99_ms",
    "run_added_p50_ms", "run_added_p95_ms",
    "run_direct_p50_ms", "run_direct_p95_ms", "run_service_p50_ms", "run_service_p95_ms",
    "open_streams_per_worker", "streams_failed", "stream_gap_p95_ms", "memory_per_stream_kb",
    "cpu_per_turn_ms", "turns_per_s_1_worker", "turns_per_s_2_workers", "scaling_ratio",
    "postgres_cpu_per_turn_ms", "redis_cpu_per_turn_ms", "postgres_cpu_s_run", "redis_cpu_s_run",
    "helpers_cpu_per_turn_ms", "scaling_ceiling",
}


@pytest.mark.slow
def test_quick_benchmark_reports_every_figure(tmp_path, postgres_url, redis_url):
    """`bench/run.py --quick` exits 0 and writes results.json with every figure numeric (targets may miss)."""
    # The benchmark's own database and Redis database, on the servers the tests use.
    database_url = urlunsplit(urlsplit(postgres_url)._replace(path="/chat_bench"))
    bench_redis_url = urlunsplit(urlsplit(redis_url)._replace(path="/9"))
    command = [sys.executable, os.path.join("bench", "run.py"), "--quick", "--out", str(tmp_path),
               "--database-url", database_url, "--redis-url", bench_redis_url]
    finished = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

    results = json.loads((tmp_path / "results.json").read_text())
    assert FIGURES <= set(results["figures"])
    for key, figure in results["figures"].items():
        value = figure["value"]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, figure)
        assert math.isfinite(value), (key, figure)
        assert figure["pass"] in (True, False, None), (key, figure)
    assert {"nproc", "cpu_model", "python"} <= set(results["machine"])
    assert results["mode"] == "quick"
    assert (tmp_path / "results.md").read_text().startswith("# Chat API benchmark (quick)")


def bench_module():
    """bench/run.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_run", os.path.join(ROOT, "bench", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scaling_ceiling_is_what_the_shared_cores_leave():
    """Two workers can go no faster than the cores allow once the helpers' CPU is paid, nor past 2x."""
    bench = bench_module()
    one_worker = {"turns": 1000, "turns_per_s": 500.0, "worker_cpu_per_turn_ms": 1.5,
                  "fake_cpu_s": 0.2, "clients_cpu_s": 0.3, "postgres_cpu_s": 0.4, "redis_cpu_s": 0.1}
    helpers = bench.helpers_cpu_per_turn_ms(one_worker)
    assert helpers == 1.0
    # 2 cores / (1.5 + 1.0) ms = 800 turns/s, 1.6 times the 500 of one worker.
    assert math.isclose(bench.scaling_ceiling(one_worker, helpers, cores=2), 1.6)
    # With helpers that cost nothing, two workers at most double it: 2 / 1.5 ms = 1333 turns/s.
    assert math.isclose(bench.scaling_ceiling(one_worker, 0.0, cores=8), 2 / 1.5 * 1000 / 500)


def test_client_comparison_prints_a_time_for_every_client():
    """`bench/clients.py` runs end to end and times each of the four clients (no timing is asserted)."""
    finished = subprocess.run([sys.executable, os.path.join("bench", "clients.py"), "--n", "20"], check=False,
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    rows = {line[:12].strip(): line[12:].split() for line in finished.stdout.splitlines()[2:]}
    assert set(rows) == {"raw socket", "http.client", "urllib3", "service"}
    for name, (p50, p95) in rows.items():
        assert 0 < float(p50) <= float(p95), (name, p50, p95)
