"""Does the dashboard stay responsive while chats run? Three designs, one run.

Each design is a real uvicorn server talking to the same slow streaming
OpenAI-compatible server (a separate process). For each: `/api/history` latency while
idle, then a burst of 50 chat submissions and the 50 chats running; the latency of each
submission; the history latency over time, plotted.

- seed-inline: the seed's original design, the LLM call inside the async handler;
- seed-threads: the seed's sketch, an in-process dict and a thread-pool background task;
- offload: this project.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.core import stats

ROOT = Path(__file__).resolve().parent.parent
CHATS = 50
ROUNDS = 5  # pooled: a p99 needs hundreds of samples, not one round's hundred
IDLE_S = 10.0
LOAD_MAX_S = 25.0
POLL_S = 0.05
PIECES, PIECE_DELAY_S = 40, 0.1  # each chat streams for about 4 s
DESIGNS = {
    "seed-inline": "bench.baselines.seed_inline:app",
    "seed-threads": "bench.baselines.seed_threads:app",
    "offload": "api_entry:app",
}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_up(url: str | None, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    if url is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code < 500:
                return
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited")
        time.sleep(0.1)
    raise RuntimeError(f"{url}: server did not start")


@contextlib.contextmanager
def _process(args: list[str], env: dict[str, str], url: str | None
             ) -> Iterator[subprocess.Popen[bytes]]:
    # The caller's own OFFLOAD_* variables stay out: a row is what its settings say.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**inherited, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_up(url, proc)
        yield proc
    finally:
        # Its supervisor process (a session of its own) and runners too, before the
        # caller removes the data folder they write to.
        family: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            family = psutil.Process(proc.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(10)
        for child in family:
            with contextlib.suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(family, timeout=10)


def _submit(client: httpx.Client, url: str) -> tuple[float, str | None]:
    started = time.perf_counter()
    try:
        answer = client.post(f"{url}/api/ai_chat_async", json={
            "messages": [{"role": "user", "content": "How is the CPU doing?"}]}, timeout=60)
        job_id = answer.json().get("job_id")
    except httpx.HTTPError:
        job_id = None
    return time.perf_counter() - started, job_id


def _all_done(url: str, ids: list[str | None]) -> bool:
    with httpx.Client(timeout=10) as client:
        for job_id in ids:
            if job_id is None:
                return False
            try:
                if client.get(f"{url}/api/ai_chat_result/{job_id}").json()["status"] in (
                        "processing", "not_found"):
                    return False
            except httpx.HTTPError:
                return False
    return True


def measure(name: str, llm_url: str) -> dict[str, Any]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="offload-bench-api-") as tmp:
        env = {"OPENAI_BASE_URL": llm_url, "OFFLOAD_DATA_DIR": str(Path(tmp) / "var"),
               "OFFLOAD_MAX_CONCURRENT": str(CHATS + 14)}
        args = ["-m", "uvicorn", DESIGNS[name], "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "warning"]
        series_file = Path(tmp) / "series.jsonl"
        with _process(args, env, f"{url}/api/history"), \
                _process(["-m", "bench.poller", f"{url}/api/history", str(series_file),
                          str(POLL_S)], {}, None):
            with httpx.Client() as client:
                time.sleep(IDLE_S)
                # A warm connection, as a page's would be: the burst times the server,
                # not this client's first connection (15-25 ms, once a round).
                client.get(f"{url}/api/history")
                burst_at = time.time()
                submits: list[tuple[float, str | None]] = []
                deadline = time.monotonic() + LOAD_MAX_S
                # The burst: 50 submissions back to back, as fast as the server answers.
                while len(submits) < CHATS and time.monotonic() < deadline:
                    submits.append(_submit(client, url))
            ids = [job_id for _, job_id in submits]
            completed = False
            load_end = time.time()
            while time.monotonic() < deadline and not completed:
                # The load ends when the chats do, before this check's own requests.
                load_end = time.time()
                completed = _all_done(url, ids)
                if not completed:
                    time.sleep(0.5)
            completed = completed and len(ids) == CHATS
        series = [(t, lat) for t, lat, status in
                  (json.loads(line) for line in series_file.read_text().splitlines())
                  if status == 200]
    return {
        "idle": [lat for t, lat in series if t < burst_at],
        "load": [lat for t, lat in series if burst_at <= t <= load_end],
        "submit": [lat for lat, _ in submits],
        "submitted": len(submits), "completed": completed, "load_s": load_end - burst_at,
        "series": [(t - burst_at, lat) for t, lat in series],
    }


def measure_rounds(name: str, llm_url: str) -> dict[str, Any]:
    """Several rounds, samples pooled: a p99 of one round is nearly its maximum."""
    rounds = [measure(name, llm_url) for _ in range(1 if name == "seed-inline" else ROUNDS)]

    def pooled(key: str) -> dict[str, float]:
        return stats([x for r in rounds for x in r[key]] or [float("nan")])

    return {
        "design": name, "rounds": len(rounds), "idle": pooled("idle"), "load": pooled("load"),
        "submit": pooled("submit"), "submitted": sum(r["submitted"] for r in rounds),
        "completed": all(r["completed"] for r in rounds),
        "load_s": max(r["load_s"] for r in rounds), "series": rounds[0]["series"],
    }


def run() -> dict[str, Any]:
    port = _free_port()
    llm_url = f"http://127.0.0.1:{port}/v1"
    # The stand-in for a remote LLM runs at nice 10: on a real deployment it would not
    # share these two cores with the API. The same for every design.
    args = ["-m", "tests.fake_llm", "--port", str(port), "--pieces", str(PIECES),
            "--delay", str(PIECE_DELAY_S), "--nice", "10"]
    with _process(args, {}, f"{llm_url}/models"):
        results = [measure_rounds(name, llm_url) for name in DESIGNS]
    return {"designs": results}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for result in results["designs"]:
        series = result["series"]
        ax.plot([t for t, _ in series], [lat * 1000 for _, lat in series],
                label=result["design"], linewidth=1)
    ax.axvline(0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlim(-IDLE_S, LOAD_MAX_S)
    ax.set_yscale("log")
    ax.set_xlabel(f"seconds since the burst of {CHATS} chat submissions began")
    ax.set_ylabel("/api/history latency (ms, log)")
    ax.set_title("Dashboard latency while chats run")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: dict[str, Any]) -> str:
    def ms(value: float) -> str:
        return f"{value * 1000:.1f}"

    rows = ["| design | history idle p50 / p99 (ms) | history under load p50 / p99 / max (ms) "
            "| load p99 / idle p99 | load max / idle p99 | submit p50 / p99 (ms) "
            "| chats done |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["designs"]:
        idle, load, submit = r["idle"], r["load"], r["submit"]
        rows.append(
            f"| {r['design']} | {ms(idle['median'])} / {ms(idle['p99'])} "
            f"| {ms(load['median'])} / {ms(load['p99'])} / {ms(load['max'])} "
            f"| {load['p99'] / idle['p99']:.2f}x | {load['max'] / idle['p99']:.2f}x "
            f"| {ms(submit['median'])} / {ms(submit['p99'])} "
            f"| {'all' if r['completed'] else 'no'} ({r['submitted']} submitted in "
            f"{r['rounds']} round(s), longest {r['load_s']:.0f} s) |")
    rows.append("")
    rows.append("Goals for offload: load p99 <= 1.5x idle p99, load max <= 3x idle p99, "
                "submit p99 <= 10 ms.")
    return "\n".join(rows)


