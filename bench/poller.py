"""`python -m bench.poller URL OUT [interval_s]`: GET URL repeatedly, one JSON line per
request (`[wall time, latency s, status]`) appended to OUT, until killed.

A process of its own, so the latency it sees is the server's, not the benchmark's."""

from __future__ import annotations

import json
import sys
import time

import httpx


def main() -> None:
    url, out = sys.argv[1], sys.argv[2]
    interval = float(sys.argv[3]) if len(sys.argv) > 3 else 0.05
    with httpx.Client(timeout=60) as client, open(out, "a", buffering=1) as f:
        while True:
            started = time.perf_counter()
            wall = time.time()
            try:
                status = client.get(url).status_code
            except httpx.HTTPError:
                status = 0
            elapsed = time.perf_counter() - started
            f.write(json.dumps([wall, elapsed, status]) + "\n")
            time.sleep(max(0.0, interval - elapsed))


if __name__ == "__main__":
    main()
