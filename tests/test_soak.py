"""Soak: 10,000 `sleep 0` jobs through the HTTP API of one real server (about five
minutes here). `OFFLOAD_SOAK_JOBS` sets another count."""

from __future__ import annotations

import os

import pytest

from bench.soak import soak

pytestmark = [pytest.mark.soak, pytest.mark.slow]


@pytest.mark.timeout(1800)
def test_ten_thousand_jobs_lose_nothing_and_leak_nothing() -> None:
    n = int(os.environ.get("OFFLOAD_SOAK_JOBS", "10000"))
    result = soak(n)
    assert result["states"] == {"completed": n}, result["errors"]
    assert result["api_rss_growth_mb"] <= 10, result["samples"]
    assert result["api_fds"][1] <= result["api_fds"][0], result["api_fds"]
    assert result["supervisor_fds"][1] <= result["supervisor_fds"][0], result["supervisor_fds"]
