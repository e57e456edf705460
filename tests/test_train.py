"""Training and prediction as jobs, and kinds of one's own."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from jobs import protocol as p
from jobs.kinds import discover
from jobs.store.job_store import JobStore
from runners import forecast
from tests.conftest import ROOT, RunningSupervisor, wait_for
from tests.server import Server


def record_history(data_dir: Path, seconds: int = 900) -> None:
    """A recorded metrics series: CPU swings with a one-minute period, memory creeps up."""
    rng = random.Random(7)
    now = time.time()
    lines = []
    for i in range(seconds):
        t = now - seconds + i
        cpu = 50 + 20 * math.sin(2 * math.pi * i / 60) + rng.gauss(0, 2)
        mem = 40 + 0.01 * i + rng.gauss(0, 0.3)
        lines.append(json.dumps({"t": t, "cpu": cpu, "mem": mem, "mem_used_mb": 1000}))
    folder = data_dir / "history"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_training_job_learns_the_recorded_history(
        data_dir: Path, make_supervisor: Callable[..., RunningSupervisor]) -> None:
    record_history(data_dir)
    sup = make_supervisor()
    job_id = sup.submit("train", epochs=1500)
    fractions = set()
    while (job := sup.job(job_id))["state"] in ("queued", "running"):
        if job["progress"] and job["progress"]["fraction"]:
            fractions.add(job["progress"]["fraction"])
        time.sleep(0.02)
    assert job["state"] == "completed", job
    result = job["result"]
    assert result["version"] == 1 and result["samples"] == 900
    for name in ("cpu", "mem"):
        error = result["error"][name]
        assert error["validation_rmse"] < error["naive_validation_rmse"], (name, error)
    assert result["error"]["cpu"]["validation_rmse"] < 4.0
    assert len(job["loss_curve"]) == 1500 and job["loss_curve"][-1] <= job["loss_curve"][0]
    assert len(fractions) >= 2, "progress is visible while it trains"
    model = forecast.load_latest(str(data_dir))
    assert model is not None and model["version"] == 1 and model["lags"] == 30


def test_a_running_training_shows_its_loss_curve_and_progress_at_one_epoch(
        data_dir: Path, make_supervisor: Callable[..., RunningSupervisor]) -> None:
    # The job file was written between the progress and the loss curve's new point: the
    # status line said epoch 133 while the chart had 132 points.
    record_history(data_dir)
    sup = make_supervisor()
    job_id = sup.submit("train", epochs=1500, lags=100, learning_rate=0.001)
    seen = []
    while (job := sup.job(job_id))["state"] in ("queued", "running"):
        if job["progress"] and job["progress"]["message"]:
            epoch = int(job["progress"]["message"].split()[1].split("/")[0])
            seen.append((epoch, len(job["loss_curve"])))
        time.sleep(0.01)
    assert job["state"] == "completed", job
    assert len(seen) > 20, seen
    assert all(epoch == points for epoch, points in seen), [s for s in seen if s[0] != s[1]]


def test_too_little_history_says_so(data_dir: Path,
                                    make_supervisor: Callable[..., RunningSupervisor]) -> None:
    record_history(data_dir, seconds=20)
    sup = make_supervisor()
    job = sup.wait_final(sup.submit("train"))
    assert job["state"] == "failed"
    assert "not enough history" in job["error"]["message"]
    assert "or lower 'lags'" not in job["error"]["message"]  # 60 whatever the lags
    record_history(data_dir, seconds=75)
    job = sup.wait_final(sup.submit("train"))
    assert "75 samples, need at least 90" in job["error"]["message"]  # three times 30 lags
    assert "or lower 'lags'" in job["error"]["message"]
    record_history(data_dir, seconds=200)
    # Enough recorded, but a window that keeps too little: waiting would not help.
    job = sup.wait_final(sup.submit("train", seconds=5, lags=1))
    assert job["state"] == "failed"
    assert job["error"]["message"].startswith(
        "'seconds' (5) keeps 6 of the 200 samples recorded, and this training needs at least "
        "60 (about one a second): raise 'seconds'"), job["error"]
    assert forecast.load_latest(str(data_dir)) is None


def test_a_sound_model_far_behind_the_naive_forecast_is_published(
        data_dir: Path, make_supervisor: Callable[..., RunningSupervisor]) -> None:
    # A busy spell that ended: over the held-out idle stretch "no change" is near perfect,
    # and a sound model, pulled towards the busy average, far behind it. Not blown up.
    rng = random.Random(3)
    now, n = time.time(), 900
    lines = [json.dumps({"t": now - n + i, "cpu": (60 + rng.gauss(0, 15)) if i < 720 else
                         1 + rng.gauss(0, 0.1), "mem": 40 + rng.gauss(0, 0.3),
                         "mem_used_mb": 1000}) for i in range(n)]
    (data_dir / "history").mkdir(parents=True, exist_ok=True)
    (data_dir / "history" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    sup = make_supervisor()
    job = sup.wait_final(sup.submit("train"))
    assert job["state"] == "completed", job
    cpu = job["result"]["error"]["cpu"]
    assert cpu["validation_rmse"] > 2 * cpu["naive_validation_rmse"], cpu
    assert forecast.load_latest(str(data_dir)) is not None


def _train(client: Any, **options: Any) -> dict[str, Any]:
    job = client.post("/api/jobs", json={"kind": "train", "input": options}).json()

    def finished() -> dict[str, Any] | None:
        current: dict[str, Any] = client.get(f"/api/jobs/{job['id']}").json()
        return None if current["state"] in ("queued", "running") else current

    return wait_for(finished, 120)


def test_predict_serves_the_latest_model(data_dir: Path,
                                         make_server: Callable[..., Server]) -> None:
    record_history(data_dir)
    server = make_server()
    with server.client() as client:
        none = client.get("/api/predict")
        assert none.status_code == 409 and "train" in none.json()["detail"]
        assert client.get("/api/predict", params={"horizon": 0}).status_code == 422
        assert client.get("/api/predict", params={"horizon": "x"}).status_code == 422

        assert _train(client, epochs=20)["state"] == "completed"
        first = client.get("/api/predict", params={"horizon": 30}).json()
        assert first["version"] == 1 and len(first["cpu"]) == 30 and len(first["mem"]) == 30
        assert all(0 <= v <= 100 for v in first["cpu"] + first["mem"])

        assert _train(client, epochs=5, lags=5)["state"] == "completed"
        second = client.get("/api/predict", params={"horizon": 30}).json()
        assert second["version"] == 2
        assert second["cpu"] != first["cpu"], "the new model's forecast is served"

        # Damaged by hand: said so, where it said "no forecasting model yet".
        latest = data_dir / "models" / "latest.json"
        kept = latest.read_bytes()
        for damage in (b'{"file": "forecast-v', b'{"version": 2}', b'{"file": "latest.json"}'):
            latest.write_bytes(damage)
            damaged = client.get("/api/predict")
            assert damaged.status_code == 409, (damage, damaged.text)
            assert "cannot be read: train one again" in damaged.json()["detail"], damage
        latest.write_bytes(kept)
        assert client.get("/api/predict").json()["version"] == 2
        # A pointer edited to no version failed every training ("int() argument must be
        # ... not 'NoneType'"): the next training is one past the models on disk.
        latest.write_bytes(b'{"version": null, "file": "gone.json"}')
        third = _train(client, epochs=5, lags=5)
        assert third["state"] == "completed" and third["result"]["version"] == 3, third
        assert client.get("/api/predict").json()["version"] == 3
        # A model numbered past the pointer (copied back, say): the next training was
        # saved below it, and that older model pointed at and served.
        shutil.copy(latest.with_name("forecast-v1.json"), latest.with_name("forecast-v8.json"))
        fourth = _train(client, epochs=5, lags=5)
        assert fourth["result"]["version"] == 9, fourth
        assert client.get("/api/predict").json()["version"] == 9
        # No sample for the model's lags (its supervisor stopped): it answered the model's
        # training mean as the machine's forecast, from nothing (`from_t` null).
        assert server.proc is not None
        supervisor = next(each for each in psutil.Process(server.proc.pid).children()
                          if "jobs.supervisor" in each.cmdline())
        supervisor.suspend()
        try:
            def refused() -> httpx.Response | None:
                answer = client.get("/api/predict")
                return answer if answer.status_code == 409 else None

            stale = wait_for(refused, 60, 0.5, "no recent sample to forecast from")
            assert "no sample of the machine in the last 10 s" in stale.json()["detail"]
        finally:
            supervisor.resume()
        wait_for(lambda: client.get("/api/predict").status_code == 200, 30, 0.2,
                 "samples again")


def _peak_rss_mb(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None  # no /proc: the answer alone is checked
    return next(int(line.split()[1]) / 1024 for line in status.splitlines()
                if line.startswith("VmHWM:"))


def test_a_model_edited_by_hand_is_said_to_be_damaged(
        data_dir: Path, make_server: Callable[..., Server]) -> None:
    # lags 10^9 had the API build a list of that many zeros (OOM-killed at ~23 GB), and
    # NaN or infinite numbers forecast zeros with a 200.
    record_history(data_dir)
    server = make_server()
    assert server.proc is not None
    with server.client() as client:
        assert _train(client, epochs=2)["state"] == "completed"
        assert client.get("/api/predict").status_code == 200
        models = data_dir / "models"
        sound = json.loads((models / "forecast-v1.json").read_text())

        def damaged(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
            model: dict[str, Any] = json.loads(json.dumps(sound))
            change(model)
            version = forecast.latest_version(str(data_dir)) + 1
            name = f"forecast-v{version}.json"
            (models / name).write_text(json.dumps(model))
            (models / "latest.json").write_text(json.dumps({"version": version, "file": name}))
            return model

        before = _peak_rss_mb(server.proc.pid)
        for change in (lambda m: m.update(lags=10**8), lambda m: m.update(lags=31),
                       lambda m: m.update(lags=30.5), lambda m: m.update(lags=True),
                       lambda m: m["series"]["cpu"]["weights"].__setitem__(3, math.nan),
                       lambda m: m["series"]["mem"]["weights"].__setitem__(0, math.inf),
                       lambda m: m["series"]["cpu"].update(mean=-math.inf),
                       lambda m: m["series"]["mem"].update(std=math.nan),
                       lambda m: m["series"]["mem"].update(std=0.0),
                       lambda m: m["series"]["cpu"].update(mean="40"),
                       lambda m: m["series"]["cpu"]["weights"].__setitem__(1, 10**400)):
            model = damaged(change)
            answer = client.get("/api/predict")
            assert answer.status_code == 409, (model["lags"], answer.text)
            assert "cannot be read: train one again" in answer.json()["detail"]
        after = _peak_rss_mb(server.proc.pid)
        if before is not None and after is not None:
            assert after - before < 200, f"the API grew by {after - before:.0f} MB"
        damaged(lambda m: None)
        assert client.get("/api/predict").status_code == 200


def test_cancelling_a_training_keeps_the_previous_model(
        data_dir: Path, make_server: Callable[..., Server]) -> None:
    record_history(data_dir)
    server = make_server()
    with server.client() as client:
        assert _train(client, epochs=10)["state"] == "completed"
        long = client.post("/api/jobs", json={"kind": "train",
                                              "input": {"epochs": 10_000}}).json()
        wait_for(lambda: (client.get(f"/api/jobs/{long['id']}").json()["progress"] or {})
                 .get("fraction"), 60)
        cancelled = client.delete(f"/api/jobs/{long['id']}").json()
        assert cancelled["state"] == "cancelled"
        served = client.get("/api/predict").json()
        assert served["version"] == 1
    assert forecast.latest_version(str(data_dir)) == 1
    assert sorted(p.name for p in (data_dir / "models").iterdir()) == [
        "forecast-v1.json", "latest.json"]


def test_direct_cli_trains_and_prints_progress(data_dir: Path) -> None:
    record_history(data_dir)
    done = subprocess.run([sys.executable, "-m", "runners.train", "--epochs", "15",
                           "--data-dir", str(data_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "epoch 15/15" in done.stderr and "100.0%" in done.stderr
    assert json.loads(done.stdout)["version"] == 1
    # The data folder a `.env` names, as the server's (its --data-dir default came from
    # the environment alone); --learning-rate as the job's input has it.
    folder = data_dir.parent / "elsewhere"
    folder.mkdir()
    (folder / ".env").write_text(f"OFFLOAD_DATA_DIR={data_dir}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
    again = subprocess.run([sys.executable, "-m", "runners.train", "--epochs", "2",
                            "--learning-rate", "0.01"], cwd=folder, capture_output=True,
                           text=True, timeout=120, env=env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["version"] == 2
    # Every option of the job's input has its own (--validation had none).
    held_out = subprocess.run([sys.executable, "-m", "runners.train", "--epochs", "2",
                               "--validation", "0.5", "--data-dir", str(data_dir)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    assert held_out.returncode == 0, held_out.stderr
    assert json.loads(held_out.stdout)["version"] == 3
    beyond = subprocess.run([sys.executable, "-m", "runners.train", "--validation", "0.9",
                             "--data-dir", str(data_dir)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert beyond.returncode == 2, beyond.stderr
    assert beyond.stderr.splitlines()[-1].endswith(
        "error: 'validation' must be a number from 0.05 to 0.5"), beyond.stderr


def test_trainings_ending_at_once_each_publish_a_model_of_their_own(data_dir: Path) -> None:
    # Two trainings saving at once (a kind cap of 2, a schedule's and one's own) took the
    # same version: both said version N, and one's model was the other's.
    record_history(data_dir, seconds=300)
    for _ in range(4):
        starts = [subprocess.Popen([sys.executable, "-m", "runners.train", "--epochs", "1",
                                    "--lags", "1", "--data-dir", str(data_dir)], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                  for _ in range(8)]
        versions = [json.loads(start.communicate(timeout=120)[0])["version"] for start in starts]
        assert len(set(versions)) == len(versions), sorted(versions)
    models = data_dir / "models"
    for version in range(1, 33):
        assert json.loads((models / f"forecast-v{version}.json").read_text())["version"] == version
    assert json.loads((models / "latest.json").read_text())["version"] == 32


def test_direct_cli_on_a_folder_without_history_says_so(tmp_path: Path) -> None:
    # It said to let the dashboard run a few minutes, whatever folder it was given.
    elsewhere = tmp_path / "not-the-data-folder"
    done = subprocess.run([sys.executable, "-m", "runners.train", "--data-dir", str(elsewhere)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "no history to learn from at" in done.stderr and "not-the-data-folder" in done.stderr
    assert "Traceback" not in done.stderr
    # A new data folder (the dashboard's first sample is a second away): as before.
    (elsewhere / "jobs").mkdir(parents=True)
    done = subprocess.run([sys.executable, "-m", "runners.train", "--data-dir", str(elsewhere)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "not enough history to learn from yet" in done.stderr


def test_direct_cli_on_a_file_or_an_unreadable_history_says_so(tmp_path: Path) -> None:
    # A traceback (NotADirectoryError, IsADirectoryError), its last line "failed: ...".
    def train(data_dir: Path | str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "runners.train", "--data-dir",
                               str(data_dir)], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    done = train(a_file)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1].endswith(
        f"error: --data-dir {a_file} is no folder: give Offload's data folder "
        "(its history/metrics.jsonl)"), done.stderr
    # Out of the API's bounds (a 422 there): bad usage too, before anything is read.
    lags = subprocess.run([sys.executable, "-m", "runners.train", "--lags", "0", "--data-dir",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert lags.returncode == 2, lags.stderr
    assert lags.stderr.splitlines()[-1].endswith(
        "error: 'lags' must be a whole number from 1 to 600"), lags.stderr
    (tmp_path / "data" / "history" / "metrics.jsonl").mkdir(parents=True)
    for data_dir, why in ((tmp_path / "data", "Is a directory"),
                          (a_file / "below", "Not a directory")):
        done = train(data_dir)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines() == [
            f"failed: cannot read the history at {data_dir}/history/metrics.jsonl ({why}): "
            f"is '{data_dir}' Offload's data folder (--data-dir, OFFLOAD_DATA_DIR)?"]


# A byte that is no UTF-8 failed the job with "UnicodeDecodeError: 'utf-8' codec can't
# decode byte 0xff"; a value edited by hand with "ValueError: could not convert string to
# float: 'abc'" (a time of "x" with a TypeError where 'seconds' cut the history); a NaN
# made the training diverge.
@pytest.mark.parametrize("damaged", [
    [b'{"t": 1, "cpu": 5\xff, "mem": 4}'],
    [b'{"t": 1, "cpu": "abc", "mem": 4}', b'{"t": "x", "cpu": 5, "mem": 4}',
     b'{"t": 1, "cpu": NaN, "mem": 4}', b'{"t": 1, "cpu": 5, "mem": 1e400}'],
], ids=["no-utf8", "no-finite-number"])
def test_a_damaged_history_line_is_skipped(
        data_dir: Path, make_supervisor: Callable[..., RunningSupervisor],
        damaged: list[bytes]) -> None:
    record_history(data_dir, seconds=200)
    history = data_dir / "history" / "metrics.jsonl"
    lines = history.read_bytes().splitlines()
    for n, line in enumerate(damaged):
        lines[100 + 10 * n] = line
    history.write_bytes(b"\n".join(lines) + b"\n")
    sup = make_supervisor()
    job = sup.wait_final(sup.submit("train", epochs=2, seconds=10**6))
    assert job["state"] == "completed", job
    assert job["result"]["samples"] == 200 - len(damaged)  # left out, as a torn line


def test_kinds_of_ones_own() -> None:
    kinds = discover(env="echo=runners.sleep, ")
    assert kinds["echo"].module == "runners.sleep" and kinds["echo"].input_model is None
    assert {"chat", "sleep", "train", "echo"} <= set(kinds)  # entries that are no kind:
    # test_integrity.py::test_an_offload_kinds_entry_that_is_no_kind_is_said


def test_own_kind_runs_through_the_api(make_server: Callable[..., Server]) -> None:
    server = make_server(env={"OFFLOAD_KINDS": "echo=runners.sleep"})
    with server.client() as client:
        job = client.post("/api/jobs", json={"kind": "echo", "input": {"seconds": 0.1}}).json()
        final = wait_for(lambda: (j := client.get(f"/api/jobs/{job['id']}").json())
                         ["state"] == "completed" and j, 30)
        assert final["result"]["echo"] == {"seconds": 0.1}
        unknown = client.post("/api/jobs", json={"kind": "nope"})
        assert unknown.status_code == 422
        assert "chat, echo, sleep, train" in unknown.json()["detail"]


@pytest.mark.parametrize("options", [{"epochs": 0}, {"lags": "many"}, {"extra": 1}])
def test_bad_training_options_are_422(make_server: Callable[..., Server],
                                      options: dict[str, Any]) -> None:
    server = make_server()
    with server.client() as client:
        answer = client.post("/api/jobs", json={"kind": "train", "input": options})
        assert answer.status_code == 422 and "input." in answer.json()["detail"]


def test_a_retried_training_shows_only_its_own_loss_curve(data_dir: Path) -> None:
    """A job file that an earlier attempt left a loss curve in (a retry after a transient
    failure, or `--force` by hand) ends with this attempt's epochs only."""
    record_history(data_dir)
    store = JobStore(data_dir / "jobs")
    job_id = store.create("train", {"epochs": 5}, 120)["id"]
    path = store.path(job_id)
    p.write_json(path, {**store.read(job_id), "loss_curve": [9.0, 9.0, 9.0]})
    subprocess.run([sys.executable, "-m", "runners.train", "--job-file", str(path)],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    job = store.read(job_id)
    assert job["state"] == "completed", job
    assert len(job["loss_curve"]) == 5 and 9.0 not in job["loss_curve"], job["loss_curve"]


def _no_json(constant: str) -> Any:
    raise ValueError(f"{constant} is no JSON (a browser's JSON.parse refuses it)")


def test_a_diverging_training_fails_and_keeps_the_previous_model(
        data_dir: Path, make_server: Callable[..., Server]) -> None:
    # A learning rate within bounds that made the loss NaN: the job completed, its file
    # held NaN (its cancel answered 500, its events were no JSON), and a model of NaNs
    # replaced the good one (/api/predict served zeros).
    record_history(data_dir)
    server = make_server()
    with server.client() as client:
        assert _train(client, epochs=10)["state"] == "completed"
        diverged = _train(client, learning_rate=1.0, epochs=2000)
        assert diverged["state"] == "failed", diverged
        assert "training diverged" in diverged["error"]["message"]
        assert "lower 'learning_rate'" in diverged["error"]["message"]
        # Its last loss before NaN, near 1e300, was said in all its 300 digits.
        said = diverged["progress"]["message"]
        assert re.fullmatch(r"epoch \d+/2000 loss \S{1,12}", said), said
        # numpy's "RuntimeWarning: overflow encountered in square", with its source line.
        output = client.get(f"/api/jobs/{diverged['id']}/log").text
        assert "RuntimeWarning" not in output and "training diverged" in output, output
        assert client.get("/api/predict").json()["version"] == 1
        # Blown up short of NaN (RMSE 1e13 against the naive 17): it completed and was
        # published, and /api/predict swung between 0 and 100 %.
        for options in ({"learning_rate": 0.5, "epochs": 2}, {"learning_rate": 1.0,
                                                              "epochs": 1}):
            blown = _train(client, **options)
            assert blown["state"] == "failed", (options, blown)
            said = blown["error"]["message"]
            assert "training blew up" in said and "is not published" in said, said
            assert f"lower 'learning_rate' (it was {options['learning_rate']}" in said, said
        assert client.get("/api/predict").json()["version"] == 1
        # A NaN a runner of one's own writes is null to every client, as a GET has it.
        job_file = data_dir / "jobs" / diverged["id"] / p.JOB_FILE
        data = json.loads(job_file.read_text())
        data["loss_curve"], data["result"] = [1.0, float("nan")], {"rmse": float("inf")}
        job_file.write_text(json.dumps(data))
        wait_for(lambda: client.get(f"/api/jobs/{diverged['id']}").json()["loss_curve"]
                 == [1.0, None], 30)
        refused = client.delete(f"/api/jobs/{diverged['id']}")
        assert refused.status_code == 409 and refused.json()["job"]["loss_curve"] == [1.0, None]
        with client.stream("GET", f"/api/jobs/{diverged['id']}/events") as events:
            line = next(line for line in events.iter_lines() if line.startswith("data: "))
        event = json.loads(line[len("data: "):], parse_constant=_no_json)
        assert event["loss_curve"] == [1.0, None] and event["result"] == {"rmse": None}
