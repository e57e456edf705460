"""The benchmarks run (their figures are judged in bench/, not here)."""

from __future__ import annotations

from bench import core


def test_core_benchmark_runs_and_reports() -> None:
    results = {"lifecycle": core.lifecycle(rounds=2),
               "throughput": core.throughput(n=10, cap=4),
               "peak_rss": core.peak_rss(rounds=1)}
    assert results["throughput"]["completed"] == 10
    table = core.report(results)
    assert "lifecycle / bare start" in table and "jobs/s" in table
