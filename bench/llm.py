"""The chat path, measured.

1. Which client library a chat runner should use: the standard library's http.client,
   httpx, or the openai SDK. Import cost, and a fresh interpreter's start until its
   first request reaches the server.
2. A chat job's own overhead beyond the model's time: runner start -> request sent,
   last token sent -> final state written.
3. First token visible on `/api/jobs/{id}/events` after the server sent it.
4. `/api/history` latency while 4 chats run on the embedded model (CPU-bound).
5. Several chats at once on the embedded model, for each engine in the same run
   (llama-cpp-python's server answers one at a time, llama-server batches them): the
   first token of each of 4 chats submitted together (on its event stream, as the
   dashboard sees it), aggregate tokens/s of 4 against one alone, and `/api/history`
   meanwhile; several bursts, as which chats share the model's first batch varies.
6. The seed app's frontend's chats (`python -m bench.llm seed`): 8 sent together through
   `/api/ai_chat_async`, each polled every second for 30 s and then given up, as its
   snippet does; the embedded model's default answer length against the earlier one, in
   turns, round after round.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.api import ROOT, _free_port, _process
from bench.core import _supervised, _wait_final, stats
from jobs import protocol as p
from runners.chat import EMBEDDED_MAX_TOKENS
from tests.fake_llm import FakeLLM

CLIENT_SCRIPTS = {
    "stdlib http.client": """
import http.client, json
c = http.client.HTTPConnection("127.0.0.1", {port})
c.request("POST", "/v1/chat/completions", json.dumps({{"messages": [], "stream": True}}),
          {{"Content-Type": "application/json"}})
c.getresponse().read()
""",
    "httpx": """
import httpx
with httpx.stream("POST", "http://127.0.0.1:{port}/v1/chat/completions",
                  json={{"messages": [], "stream": True}}) as r:
    r.read()
""",
    "openai SDK": """
import openai
client = openai.OpenAI(base_url="http://127.0.0.1:{port}/v1", api_key="none")
for _ in client.chat.completions.create(model="m", messages=[], stream=True):
    pass
""",
}
IMPORTS = {"stdlib http.client": "import http.client, json", "httpx": "import httpx",
           "openai SDK": "import openai"}


def _median_run(args: list[str], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        subprocess.run([sys.executable, *args], check=True, cwd=ROOT)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def clients(rounds: int = 15) -> dict[str, Any]:
    bare = _median_run(["-c", "pass"], rounds)
    out: dict[str, Any] = {"bare_s": bare, "clients": {}}
    with FakeLLM(pieces=["x"], delay_s=0) as llm:
        port = int(llm.base_url.split(":")[2].split("/")[0])
        for name, script in CLIENT_SCRIPTS.items():
            import_s = _median_run(["-c", IMPORTS[name]], rounds) - bare
            to_request = []
            for _ in range(rounds):
                before = len(llm.request_wall)
                started = time.time()
                subprocess.run([sys.executable, "-c", script.format(port=port)], check=True,
                               capture_output=True)
                to_request.append(llm.request_wall[before] - started)
            out["clients"][name] = {"import_s": import_s,
                                    "start_to_request_s": statistics.median(to_request)}
    return out


def overhead(rounds: int = 20) -> dict[str, Any]:
    """Sequential chats, so each job lines up with the server's records."""
    start_to_request, last_to_final = [], []
    with FakeLLM(pieces=["a ", "b ", "c"], delay_s=0.05) as llm, \
            _supervised(4, {"OPENAI_BASE_URL": llm.base_url}) as (store, supervisor):
        for _ in range(rounds):
            before = len(llm.request_wall)
            job = store.create("chat", {"messages": [{"role": "user", "content": "hi"}],
                                        "expert": False}, 30)
            supervisor.wake()
            final = _wait_final(store, job["id"])
            assert final[p.F_STATE] == p.JobState.COMPLETED, final
            run = p.read_json(store.path(job["id"]).parent / p.RUN_FILE) or {}
            # launched_ns: taken right after the spawn (psutil's create time is only
            # accurate to the boot time's whole second).
            start_to_request.append(llm.request_wall[before] - run["launched_ns"] / 1e9)
            last_to_final.append(p.parse_iso(final[p.F_FINISHED_AT]) - llm.last_piece_sent[-1])
    return {"start_to_request": stats(start_to_request), "last_to_final": stats(last_to_final)}


def first_token_on_events(rounds: int = 15) -> dict[str, Any]:
    delays = []
    with FakeLLM(pieces=["first ", "second"], delay_s=0.3) as llm, \
            tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        env = {"OPENAI_BASE_URL": llm.base_url, "OFFLOAD_DATA_DIR": str(Path(tmp) / "var")}
        with _process(["-m", "uvicorn", "api_entry:app", "--port", str(port),
                       "--log-level", "warning"], env, f"{url}/api/health"), \
                httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(rounds):
                before = len(llm.first_piece_sent)
                job = client.post("/api/jobs", json={"kind": "chat", "input": {
                    "messages": [{"role": "user", "content": "hi"}]}}).json()
                with client.stream("GET", f"/api/jobs/{job['id']}/events") as stream:
                    for line in stream.iter_lines():
                        event = json.loads(line[6:]) if line.startswith("data: ") else {}
                        # The first event holds `output`; later ones what was appended.
                        if event.get("output") or event.get("output_delta"):
                            delays.append(time.time() - llm.first_piece_sent[before])
                            break
    return {"first_token_visible": stats(delays)}


def _until_the_model_is_ready(client: httpx.Client, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not client.get("/api/health").json()["llm"]["ready"]:
        if time.monotonic() > deadline:
            raise RuntimeError("the embedded model did not load")
        time.sleep(0.5)


def embedded_history(chats: int = 4, idle_s: float = 20.0) -> dict[str, Any]:
    """History latency while chats run on the embedded model (CPU-bound)."""
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        series_file = Path(tmp) / "series.jsonl"
        env = {"OFFLOAD_DATA_DIR": str(Path(tmp) / "var"), "OPENAI_BASE_URL": ""}
        with _process(["-m", "uvicorn", "api_entry:app", "--port", str(port),
                       "--log-level", "warning"], env, f"{url}/api/health"), \
                httpx.Client(base_url=url, timeout=30) as client:
            _until_the_model_is_ready(client)
            with _process(["-m", "bench.poller", f"{url}/api/history", str(series_file),
                           "0.05"], {}, None):
                time.sleep(idle_s)
                burst = time.time()
                ids = [client.post("/api/ai_chat_async", json={
                    "messages": [{"role": "user", "content": "Explain CPU load in detail."}],
                }).json()["job_id"] for _ in range(chats)]
                while any(client.get(f"/api/ai_chat_result/{i}").json()["status"] ==
                          "processing" for i in ids):
                    time.sleep(0.5)
                end = time.time()
        series = [json.loads(line) for line in series_file.read_text().splitlines()]
    idle = [lat for t, lat, status in series if t < burst and status == 200]
    load = [lat for t, lat, status in series if burst <= t <= end and status == 200]
    return {"idle": stats(idle), "load": stats(load), "load_s": end - burst, "chats": chats}


# Long answers from either engine alike: greedy decoding, cut at MAX_TOKENS. Each chat's
# prompt differs from its first token: no chat finds another's prompt in the model's cache.
MAX_TOKENS = 256


def _long_answer(number: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"{number}. Write a long essay about "
                                                     "the history of computers."}],
            "max_tokens": MAX_TOKENS, "temperature": 0, "expert": False}


_numbers = itertools.count(1)


def _first_output(client: httpx.Client, job_id: str) -> float:
    """Follow a job's event stream, as the dashboard does, to its final state; when its
    first output arrived."""
    first = None
    with client.stream("GET", f"/api/jobs/{job_id}/events") as stream:
        for line in stream.iter_lines():
            event = json.loads(line[6:]) if line.startswith("data: ") else {}
            # The first event holds `output`; later ones what was appended.
            if first is None and (event.get("output") or event.get("output_delta")):
                first = time.time()
            if event.get("state") in p.FINAL_STATES:
                break
    if first is None:
        raise RuntimeError(f"chat {job_id} ended without output")
    return first


def _chats_at_once(client: httpx.Client, count: int) -> dict[str, Any]:
    """Submit `count` chats together; each one's first output (seen on its event stream),
    in seconds from its own submission, and the aggregate tokens/s."""
    submitted: dict[str, float] = {}
    # A client each, made beforehand: making one costs the bench CPU the chats need.
    streams = [httpx.Client(base_url=client.base_url, timeout=600) for _ in range(count)]
    started = time.time()
    with concurrent.futures.ThreadPoolExecutor(count) as pool, contextlib.ExitStack() as stack:
        for each in streams:
            stack.enter_context(each)
        followers = []
        for stream in streams:
            job_id = client.post("/api/jobs", json={"kind": "chat", "input": _long_answer(
                next(_numbers))}).json()["id"]
            submitted[job_id] = time.time()
            followers.append(pool.submit(_first_output, stream, job_id))
        firsts = [follower.result() for follower in followers]
    finals = [client.get(f"/api/jobs/{job_id}").json() for job_id in submitted]
    if any(j["state"] != "completed" for j in finals):
        raise RuntimeError(f"a chat did not complete: {[j['state'] for j in finals]}")
    tokens = sum(_tokens(j["result"]) for j in finals)
    wall = max(p.parse_iso(j[p.F_FINISHED_AT]) for j in finals) - started
    return {"first_token_s": [f - s for f, s in zip(firsts, submitted.values(), strict=True)],
            "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "end": started + wall}


def _tokens(result: dict[str, Any]) -> int:
    counted = (result.get("usage") or {}).get("completion_tokens")
    if counted:
        return int(counted)
    if result.get("finish_reason") != "length":  # cut short: its length is unknown here
        raise RuntimeError(f"a reply ended before {MAX_TOKENS} tokens: {result}")
    return MAX_TOKENS


def _spread(first_token_s: list[float]) -> float:
    """The slowest first token of a burst over the quickest."""
    return max(first_token_s) / min(first_token_s)


def concurrency(chats: int = 4, bursts: int = 5, idle_s: float = 10.0) -> dict[str, Any]:
    """`bursts` rounds of `chats` submitted together per engine, each after `idle_s` of
    quiet: which chats share the model's first batch depends on when each request
    reaches it, so one burst alone says little."""
    out: dict[str, Any] = {"chats": chats, "bursts": bursts}
    for engine in ("llama-cpp-python", "llama-server"):
        with tempfile.TemporaryDirectory() as tmp:
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            series_file = Path(tmp) / "series.jsonl"
            env = {"OFFLOAD_DATA_DIR": str(Path(tmp) / "var"), "OPENAI_BASE_URL": "",
                   "OFFLOAD_LLM_ENGINE": engine, "OFFLOAD_MAX_CONCURRENT": str(chats)}
            with _process(["-m", "uvicorn", "api_entry:app", "--port", str(port),
                           "--log-level", "warning"], env, f"{url}/api/health"), \
                    httpx.Client(base_url=url, timeout=30) as client:
                _until_the_model_is_ready(client)
                status = p.read_json(Path(tmp) / "var" / "llm.json") or {}
                if status.get("engine") != engine:
                    raise RuntimeError(f"{engine} is not what runs: {status}")
                _chats_at_once(client, 1)  # warm: the model's pages, the runners' imports
                alone = _chats_at_once(client, 1)
                together, windows = [], []
                with _process(["-m", "bench.poller", f"{url}/api/history", str(series_file),
                               "0.05"], {}, None):
                    for _ in range(bursts):
                        time.sleep(idle_s)
                        burst = time.time()
                        together.append(_chats_at_once(client, chats))
                        windows.append((burst, together[-1]["end"]))
            series = [json.loads(line) for line in series_file.read_text().splitlines()]
        ok = [(t, lat) for t, lat, code in series if code == 200]
        load = [lat for t, lat in ok if any(a <= t <= b for a, b in windows)]
        idle = [lat for t, lat in ok if not any(a - 1 <= t <= b + 1 for a, b in windows)]
        out[engine] = {"slots": status.get("slots"), "alone": alone, "together": together,
                       "history_idle": stats(idle), "history_load": stats(load)}
    return out


SEED_CHATS = 8
SEED_GIVES_UP_S = 30.0  # the original frontend's setTimeout
SEED_POLL_S = 1.0  # and its setInterval
EARLIER_MAX_TOKENS = 512  # the embedded model's default answer length before 0.10


def _seed_chat(url: str, number: int) -> float | None:
    """A chat as the original frontend sends and polls it: seconds until its answer was
    seen, or None where it gave up first."""
    with httpx.Client(base_url=url, timeout=SEED_GIVES_UP_S) as client:
        started = time.monotonic()
        job_id = client.post("/api/ai_chat_async", json={"messages": [{
            "role": "user", "content": f"Tell me about CPU usage on a server, number {number}."
        }], "session_id": f"seed-{number}"}).json()["job_id"]
        while time.monotonic() - started < SEED_GIVES_UP_S:
            time.sleep(SEED_POLL_S)
            status = client.get(f"/api/ai_chat_result/{job_id}").json()["status"]
            if status in ("completed", "error"):  # as the frontend: an error ends its polls
                return time.monotonic() - started if status == "completed" else None
    return None


def seed_frontend(rounds: int = 2) -> dict[str, Any]:
    """SEED_CHATS chats sent together as the original frontend does, on the embedded
    model with its default answer length and with the earlier one, in turns."""
    out: dict[str, Any] = {"chats": SEED_CHATS, "rounds": []}
    for _ in range(rounds):
        this_round = {}
        for name, max_tokens in (("default", None), ("earlier", EARLIER_MAX_TOKENS)):
            with tempfile.TemporaryDirectory() as tmp:
                port = _free_port()
                url = f"http://127.0.0.1:{port}"
                env = {"OFFLOAD_DATA_DIR": str(Path(tmp) / "var"), "OPENAI_BASE_URL": "",
                       **({"OFFLOAD_LLM_MAX_TOKENS": str(max_tokens)} if max_tokens else {})}
                with _process(["-m", "uvicorn", "api_entry:app", "--port", str(port),
                               "--log-level", "warning"], env, f"{url}/api/health"), \
                        httpx.Client(base_url=url, timeout=30) as client:
                    _until_the_model_is_ready(client)
                    with concurrent.futures.ThreadPoolExecutor(SEED_CHATS) as pool:
                        this_round[name] = list(pool.map(
                            lambda n, url=url: _seed_chat(url, n), range(SEED_CHATS)))
        out["rounds"].append(this_round)
    return out


def seed_report(s: dict[str, Any]) -> str:
    rows = [f"{s['chats']} chats sent together through `/api/ai_chat_async`, each polled "
            f"every {SEED_POLL_S:g} s and given up after {SEED_GIVES_UP_S:g} s, as the "
            "seed app's frontend does (the embedded model):", "",
            "| round | answer length | answers seen | seconds until each was seen |",
            "| --- | --- | ---: | --- |"]
    for number, this_round in enumerate(s["rounds"], 1):
        for name, label in (("default", f"default ({EMBEDDED_MAX_TOKENS} tokens)"),
                            ("earlier", f"{EARLIER_MAX_TOKENS} tokens (before 0.10)")):
            seen = this_round[name]
            rows.append(f"| {number} | {label} | {sum(t is not None for t in seen)} of "
                        f"{len(seen)} | " + ", ".join(
                            "-" if t is None else f"{t:.0f}" for t in seen) + " |")
    return "\n".join(rows)


def run() -> dict[str, Any]:
    return {"clients": clients(), "overhead": overhead(), "events": first_token_on_events(),
            "embedded": embedded_history(), "concurrency": concurrency(),
            "seed": seed_frontend()}


def concurrency_report(c: dict[str, Any]) -> str:
    engines = ("llama-cpp-python", "llama-server")
    rows = [f"{c['chats']} chats submitted together on the embedded model "
            f"(at most {MAX_TOKENS} tokens each), {c['bursts']} bursts per engine; each "
            "first token on its chat's event stream, from its own submission:", "",
            f"| measure | {' | '.join(engines)} | goal |", "| --- | --- | --- | --- |"]

    def row(name: str, goal: str, cell: Any) -> None:
        rows.append(f"| {name} | {' | '.join(cell(c[e]) for e in engines)} | {goal} |")

    def median(r: dict[str, Any], measure: Callable[[dict[str, Any]], float]) -> float:
        return statistics.median(measure(burst) for burst in r["together"])

    row("slots (chats decoded at once)", "", lambda r: str(r["slots"]))
    row("first tokens of each burst, in order of submission (s)", "", lambda r: "<br>".join(
        " / ".join(f"{t:.2f}" for t in burst["first_token_s"]) for burst in r["together"]))
    row("slowest first token / quickest, each burst", "", lambda r: ", ".join(
        f"{_spread(burst['first_token_s']):.2f}x" for burst in r["together"]))
    row("the same, median of the bursts", "<= 1.5x",
        lambda r: f"{median(r, lambda b: _spread(b['first_token_s'])):.2f}x")
    row("4th chat's first token, median of the bursts (s)", "",
        lambda r: f"{median(r, lambda b: b['first_token_s'][-1]):.2f}")
    row("tokens/s, one chat alone", "", lambda r: f"{r['alone']['tokens_per_s']:.1f}")
    row(f"tokens/s, {c['chats']} together (aggregate, median of the bursts)", "",
        lambda r: f"{median(r, lambda b: b['tokens_per_s']):.1f}")
    row(f"aggregate of {c['chats']} / one alone", ">= 1.5x", lambda r: (
        f"{median(r, lambda b: b['tokens_per_s']) / r['alone']['tokens_per_s']:.2f}x"))
    row("/api/history p99 idle / during (ms)", "", lambda r: (
        f"{r['history_idle']['p99'] * 1000:.1f} / {r['history_load']['p99'] * 1000:.1f}"))
    row("/api/history p99 during / idle", "<= 1.5x", lambda r: (
        f"{r['history_load']['p99'] / r['history_idle']['p99']:.2f}x"))
    return "\n".join(rows)


def report(results: dict[str, Any]) -> str:
    c = results["clients"]
    rows = ["Client library (fresh interpreter; bare start "
            f"{c['bare_s'] * 1000:.1f} ms):", "",
            "| client | import cost (ms) | process start -> request at server (ms) |",
            "| --- | --- | --- |"]
    for name, r in c["clients"].items():
        rows.append(f"| {name} | {r['import_s'] * 1000:.1f} "
                    f"| {r['start_to_request_s'] * 1000:.1f} |")
    o, e, m = results["overhead"], results["events"]["first_token_visible"], results["embedded"]

    def ms(s: dict[str, float]) -> str:
        return f"{s['median'] * 1000:.1f} / {s['p90'] * 1000:.1f} / {s['max'] * 1000:.1f}"

    rows += ["", "| measure | median / p90 / max (ms) | goal |", "| --- | --- | --- |",
             f"| chat runner start -> request sent | {ms(o['start_to_request'])} "
             "| median <= 100 ms |",
             f"| last token sent -> final state written | {ms(o['last_to_final'])} "
             "| median <= 100 ms |",
             f"| first token sent -> visible on /events | {ms(e)} | <= 150 ms |",
             f"| /api/history idle (embedded model loaded) | {ms(m['idle'])} | baseline |",
             f"| /api/history while {m['chats']} chats run on the embedded model "
             f"({m['load_s']:.0f} s) | {ms(m['load'])} "
             f"| p99 {m['load']['p99'] / m['idle']['p99']:.2f}x idle p99 (goal <= 1.5x), "
             f"max {m['load']['max'] / m['idle']['p99']:.2f}x (goal <= 3x) |"]
    if "concurrency" in results:
        rows += ["", concurrency_report(results["concurrency"])]
    if "seed" in results:
        rows += ["", seed_report(results["seed"])]
    return "\n".join(rows)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.llm", description=(
        "The chat path, measured: with no part named, parts 1-5 of this module's "
        "description; part 5 alone, or part 6 alone, as named."))
    parser.add_argument("part", nargs="?", choices=["concurrency", "seed"])
    part = parser.parse_args().part
    if part == "concurrency":
        print(concurrency_report(concurrency()))
    elif part == "seed":
        print(seed_report(seed_frontend()))
    else:
        print(report(run()))
