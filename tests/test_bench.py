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
    "relay_cpu_per_chunk_us", "relay_chunks_in_window", "relay_cpu_per_chunk_whole_us", "relay_streams_failed",
    "relay_delay_added_p50_ms", "relay_delay_added_p99_ms",
    "relay_delay_direct_p50_ms", "relay_delay_direct_p99_ms", "relay_delay_service_p50_ms",
    "relay_delay_service_p99_ms", "relay_fake_cpu_per_chunk_us", "relay_clients_cpu_per_chunk_us",
    "resume_same_instance_p50_ms", "resume_same_instance_p95_ms", "resume_other_instance_p50_ms",
    "resume_other_instance_p95_ms",
    "cpu_per_turn_ms_metrics_off", "metrics_cpu_share_ab", "metrics_cpu_per_turn_us", "metrics_cpu_per_stream_us",
    "metrics_cpu_share",
}
# Figures of the revision the quick run is compared with (--against HEAD), by the start of their key.
AGAINST = ("cpu_per_turn_ms_head_", "ttft_added_p50_ms_head_", "ttft_added_p99_ms_head_", "relay_cpu_per_chunk_us_head_",
           "relay_cpu_change_head_")
# Figures of the plain way and the bare minimum (bench/floor), which every run measures beside the service.
FLOOR = ("cpu_per_turn_ms_the_plain_way", "ttft_added_p50_ms_the_plain_way",
         "ttft_added_p99_ms_the_plain_way", "relay_cpu_per_chunk_us_the_plain_way",
         "ttft_added_p50_ms_the_bare_minimum", "relay_cpu_per_chunk_us_the_bare_minimum",
         "cpu_per_turn_ms_the_bare_minimum")
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
    "cpu_per_turn_ms_metrics_off": (0, 50),
    # the meter's calls for one turn: microseconds, a small share of the turn
    "metrics_cpu_per_turn_us": (0, 1000),
    "metrics_cpu_per_stream_us": (0, 1000),
    "metrics_cpu_share": (0, 100),
    "metrics_cpu_share_ab": (-100, 100),
    # from the GET to the first replayed event: at most the journal's flush (250 ms) and a Redis wait (1 s)
    **{f"resume_{where}_p{q}_ms": (0, 3000) for where in ("same_instance", "other_instance") for q in (50, 95)},
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
               "--database-url", BENCH_DATABASE_URL, "--redis-url", BENCH_REDIS_URL, "--against", "HEAD"]
    finished = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

    results = json.loads((tmp_path / "results.json").read_text())
    assert FIGURES <= set(results["figures"])
    for start in AGAINST:
        assert any(key.startswith(start) for key in results["figures"]), (start, sorted(results["figures"]))
    for key in FLOOR:
        assert 0 < results["figures"][key]["value"] < 5000, (key, results["figures"][key])
    assert_plausible(results)
    assert_targets_judged(results)
    assert_relay_figures_are_measurements(results)
    assert {"nproc", "cpu_model", "python"} <= set(results["machine"])
    assert results["mode"] == "quick"
    assert (tmp_path / "results.md").read_text().startswith("# Chat API benchmark (quick)")


def assert_relay_figures_are_measurements(results):
    """The relay figures fall where only a measuring bug would put them outside, not merely exist."""
    figures = {key: figure["value"] for key, figure in results["figures"].items()}
    most_chunks = results["settings"]["relay_streams"] * results["settings"]["relay_chunks"]
    assert 0 < figures["relay_chunks_in_window"] <= most_chunks
    for key in ("relay_cpu_per_chunk_us", "relay_cpu_per_chunk_whole_us", "relay_fake_cpu_per_chunk_us",
                "relay_clients_cpu_per_chunk_us"):
        assert 0 < figures[key] < 5000, (key, figures[key])
    for side in ("direct", "service"):
        assert 0 <= figures[f"relay_delay_{side}_p50_ms"] <= figures[f"relay_delay_{side}_p99_ms"] < 10_000, side
    assert figures["relay_streams_failed"] == 0, results["notes"]


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


def test_chunk_lateness_counts_from_the_least_late_chunk_of_the_stream():
    """A chunk's lateness is against the 20 ms schedule its stream's least late chunk sets, never negative."""
    bench = bench_module()
    # Due at 10.000, 10.020, 10.040, 10.060; the first came 3 ms late, the third 8 ms.
    lateness = bench.lateness_ms([10.003, 10.020, 10.048, 10.060], 0.02)
    assert [round(ms, 6) for ms in lateness] == [3.0, 0.0, 8.0, 0.0]


def cpu_sample(bench, at, worker_ticks):
    """A CpuWatch snapshot at `at` with only the worker's CPU moving."""
    return {"at": at, "workers": {1: worker_ticks}, "fake": {}, "clients": {}, "master": {}, "postgres": {},
            "backends": {}, "redis": {}, "machine": (worker_ticks, 2 * bench.CLOCK_TICKS * at)}


def test_relay_cpu_counts_only_while_every_stream_relays():
    """Setting streams up and finishing them is outside the window: CPU per chunk is the relaying's alone."""
    bench = bench_module()
    early = [round(1.0 + k / 10, 1) for k in range(11)]  # relaying from 1.0 s to 2.0 s
    late = [round(1.5 + k / 10, 1) for k in range(11)]  # from 1.5 s to 2.5 s
    # 100 ticks of setting up before 1.5 s and of finishing after 2.0 s; 5 ticks in between.
    ticks = {0.0: 0, 0.5: 0, 1.0: 50, 1.5: 100, 2.0: 105, 2.5: 155, 3.0: 205}
    samples = [cpu_sample(bench, at, n) for at, n in ticks.items()]

    cpu = bench.relaying_cpu([early, late], samples)

    assert cpu["window_s"] == 0.5
    assert cpu["window_chunks"] == 10  # 1.6 to 2.0 s of each stream
    assert math.isclose(cpu["worker_cpu_per_chunk_us"], 5 / bench.CLOCK_TICKS / 10 * 1e6)


def test_relay_summary_tells_chunks_read_together_and_the_share_of_the_schedule_received():
    """Chunks that came in one read, and fewer chunks than scheduled, show that something fell behind."""
    bench = bench_module()
    on_time = [round(1.0 + k / 10, 1) for k in range(11)]
    bunched = [1.5, 1.6, 1.8, 1.8, 2.0, 2.0, 2.1, 2.2, 2.3, 2.4, 2.5]  # those due at 1.7 and 1.9 came with the next
    samples = [cpu_sample(bench, at / 2, at) for at in range(7)]

    summary = bench.relay_summary([{"failures": {}, "arrivals": [on_time, bunched]}], samples, 0.1)

    assert summary["batched_share"] == 2 / 20
    assert summary["schedule_share"] == 1.0  # 1.6 to 2.0 s: 5 chunks of each stream, as scheduled
    assert [round(summary[f"lateness_p{q}_ms"], 6) for q in (50, 99)] == [0.0, 100.0]


def test_relay_cpu_is_not_measured_when_the_streams_never_all_relayed():
    """Streams that never overlap leave no window: no chunks, and no CPU per chunk rather than a wrong one."""
    bench = bench_module()
    samples = [cpu_sample(bench, at / 10, at) for at in range(40)]
    cpu = bench.relaying_cpu([[1.0, 1.5], [2.0, 2.5]], samples)
    assert cpu["window_chunks"] == 0
    assert math.isnan(cpu["worker_cpu_per_chunk_us"])


def test_phases_option_keeps_the_running_order():
    """`--phases relay,latency` runs latency first, as the full run does; no option runs every phase."""
    bench = bench_module()
    assert bench.parse_args(["--phases", "relay,latency"]).phases == ["latency", "relay"]
    assert bench.parse_args([]).phases == list(bench.PHASES)


@pytest.mark.parametrize("phases", ["relay,latncy", ",", ""])
def test_phases_option_refuses_what_is_not_a_phase(phases):
    """A misspelt or empty list of phases is a usage error, not a run of nothing."""
    with pytest.raises(SystemExit) as exit_status:
        bench_module().parse_args(["--phases", phases])
    assert exit_status.value.code == 2


def test_report_of_a_relay_only_run_has_only_the_relay():
    """With `--phases relay`, results.md has the relay's figures and table, and nothing of the other phases."""
    bench = bench_module()
    side = {"complete": 2, "failed": 0, "failures": {}, "chunks_received": 8, "window_s": 0.5, "window_chunks": 4,
            "worker_cpu_per_chunk_us": 60.0, "worker_busy_cores": 0.5, "fake_cpu_per_chunk_us": 50.0,
            "clients_cpu_per_chunk_us": 20.0, "lateness_p50_ms": 1.0, "lateness_p99_ms": 4.0,
            "lateness_max_ms": 5.0, "gap_p50_ms": 20.0, "gap_p99_ms": 24.0, "machine_busy_cores": 1.5,
            "other_busy_cores": 0.1, "schedule_share": 1.0, "batched_share": 0.0,
            "worker_cpu_per_chunk_whole_us": 90.0}
    runner = bench.Bench.__new__(bench.Bench)
    runner.args = bench.parse_args(["--phases", "relay"])
    runner.notes, runner.figures = [], {}
    runner.results = {"phases_run": ["relay"], "duration_s": 30.0, "phases": {
        "relay": {"streams": 2, "chunks": 4, "direct": side, "service": {**side, "lateness_p99_ms": 10.0}},
        "whole_run": {"wall_s": 30.0, "postgres_s": 0.5, "redis_s": 0.1, "machine_busy_cores": 1.0}}}

    results = runner.report()
    text = bench.markdown(results)

    assert {key for key in results["figures"] if not key.endswith("_s_run")} == {
        key for key in FIGURES if key.startswith("relay_")}
    assert results["figures"]["relay_delay_added_p99_ms"] == {
        "figure": "added chunk delay p99 (lateness, service − direct)", "value": 6.0, "unit": "ms",
        "target": "<= 5", "pass": False}
    assert results["figures"]["relay_cpu_per_chunk_us"]["pass"] is False
    assert "## Relayed streams" in text and "- phases: relay" in text
    for other in ("## Open streams", "## Closed-loop", "## Latency", "time to first token"):
        assert other not in text


def test_variants_are_judged_against_this_tree(tmp_path):
    """A variant's figures stand beside this tree's, and the relay's change is this tree's cost over the variant's."""
    bench = bench_module()
    run = bench.Bench(bench.parse_args(["--quick", "--phases", "turns,relay", "--out", str(tmp_path)]))
    try:
        turns = {"worker_cpu_per_turn_ms": 1.1, "turns_per_s": 900.0}
        relay = {"direct": {"lateness_p99_ms": 2.0}, "service": {"worker_cpu_per_chunk_us": 50.0, "lateness_p99_ms": 6.0}}
        earlier = {"direct": relay["direct"], "service": {"worker_cpu_per_chunk_us": 40.0, "lateness_p99_ms": 5.0}}
        phases = {"turns_1": turns, "relay": relay,
                  "variants": {"METRICS=off": {"turns_1": {"worker_cpu_per_turn_ms": 1.0, "turns_per_s": 950.0}},
                               "v0.4 (abc)": {"relay": earlier}}}
        run.variant_figures(phases, phases["variants"])
        assert math.isclose(run.figures["metrics_cpu_share_ab"]["value"], 10.0)
        assert math.isclose(run.figures["relay_cpu_change_v0_4_abc"]["value"], 25.0)
        assert run.figures["relay_cpu_per_chunk_us_v0_4_abc"]["value"] == 40.0
        table = "\n".join(bench.variants_table(phases))
        assert "| worker CPU per relayed chunk µs; added delay p99 ms | 50.0; 4.00 | — | 40.0; 3.00 |" in table
    finally:
        run.close()
