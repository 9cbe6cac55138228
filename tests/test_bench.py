"""The benchmark (bench/run.py) runs end to end in quick mode and reports every figure, each in its plausible range."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import pytest

from tests.helpers import BENCH_DATABASE_URL, BENCH_REDIS_URL, ROOT

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
LATENCIES = [f"{kind}_{side}_p{q}_ms" for kind, quantiles in (("ttft", (50, 95, 99)), ("run", (50, 95)))
             for side in ("direct", "service") for q in quantiles]
# figure: (low, high), the bounds a plausible value lies strictly between on any machine that runs the suite
BETWEEN = {
    **{latency: (0, 5000) for latency in LATENCIES},  # a loopback turn, in ms
    "stream_gap_p95_ms": (250, 10000),  # the model's chunks come 500 ms apart
    "cpu_per_turn_ms": (0, 50),
    "helpers_cpu_per_turn_ms": (0, 100),
    "turns_per_s_1_worker": (10, 50000),
    "turns_per_s_2_workers": (10, 50000),
    "scaling_ratio": (0, 4),
    "scaling_ceiling": (0, 20),
}
# figure: high; 0 <= value < high (CPU ticks of a short window may add up to nothing)
UNDER = {"memory_per_stream_kb": 10000, "postgres_cpu_per_turn_ms": 50, "redis_cpu_per_turn_ms": 50}


def judged(value, target):
    """What a figure's target ("<= 1.5", ">= 2000") says of `value`."""
    op, bound = target.split()
    return value <= float(bound) if op == "<=" else value >= float(bound)


def assert_plausible(results):
    """Every figure is a finite number in the range it can have, and the figures agree with each other."""
    figures = {key: figure["value"] for key, figure in results["figures"].items()}
    for key, value in figures.items():
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
        assert math.isfinite(value), (key, value)
    for key, (low, high) in BETWEEN.items():
        assert low < figures[key] < high, (key, figures[key])
    for key, high in UNDER.items():
        assert 0 <= figures[key] < high, (key, figures[key])
    for latency in LATENCIES:
        if "_service_" in latency:
            added, direct = latency.replace("_service_", "_added_"), latency.replace("_service_", "_direct_")
            assert math.isclose(figures[added], figures[latency] - figures[direct], abs_tol=0.01), latency
    levels = results["settings"]["levels"]
    assert figures["open_streams_per_worker"] in levels, (figures["open_streams_per_worker"], levels)
    assert figures["streams_failed"] == int(figures["streams_failed"])
    assert 0 <= figures["streams_failed"] <= figures["open_streams_per_worker"]
    ratio = figures["turns_per_s_2_workers"] / figures["turns_per_s_1_worker"]
    assert math.isclose(figures["scaling_ratio"], ratio, abs_tol=0.01)
    cpu_seconds = results["duration_s"] * results["machine"]["nproc"]
    for key in ("postgres_cpu_s_run", "redis_cpu_s_run"):
        assert 0 <= figures[key] < cpu_seconds, (key, figures[key], cpu_seconds)


def assert_targets_judged(results):
    """A figure with a target has a pass of True or False that matches its value; one without has none."""
    for key, figure in results["figures"].items():
        if figure["target"] is None:
            assert figure["pass"] is None, (key, figure)
        else:
            assert figure["pass"] is judged(figure["value"], figure["target"]), (key, figure)


@pytest.mark.slow
def test_quick_benchmark_reports_every_figure_in_its_plausible_range(tmp_path, postgres_url, redis_url):
    """`bench/run.py --quick` exits 0 and writes results.json with every figure plausible and its target judged."""
    command = [sys.executable, os.path.join("bench", "run.py"), "--quick", "--out", str(tmp_path),
               "--database-url", BENCH_DATABASE_URL, "--redis-url", BENCH_REDIS_URL]
    finished = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

    results = json.loads((tmp_path / "results.json").read_text())
    assert FIGURES <= set(results["figures"])
    assert_plausible(results)
    assert_targets_judged(results)
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
