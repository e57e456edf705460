"""The benchmarks run (their figures are judged in bench/, not here)."""

from __future__ import annotations

from typing import Any

import pytest

from bench import core


def test_core_benchmark_runs_and_reports() -> None:
    results = {"lifecycle": core.lifecycle(rounds=2),
               "throughput": core.throughput(n=10, cap=4),
               "peak_rss": core.peak_rss(rounds=1)}
    assert results["throughput"]["completed"] == 10
    table = core.report(results)
    assert "lifecycle / bare start" in table and "jobs/s" in table


@pytest.mark.ray
def test_ray_benchmark_runs_and_reports(ray_head: Any) -> None:
    from bench import ray

    results = ray.run(rounds=2, address=ray_head.address)
    assert results["ray"]["lifecycle"]["n"] == 2
    table = ray.report(results)
    assert "Ray launcher" in table and "dispatch" in table
