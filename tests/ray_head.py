"""A real Ray head on this machine, loopback only, for the tests and the benchmark.

Started with Ray's own CLI from this interpreter's environment (`pip install
'offload[ray]'`); stopped with `ray stop --force` at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# Ray publishes wheels for these; elsewhere its tests skip.
SUPPORTED = (sys.platform == "linux" and os.uname().machine in ("x86_64", "aarch64")) or (
    sys.platform == "darwin" and os.uname().machine == "arm64")
START_TIMEOUT_S = 120.0


def ray_cli() -> str | None:
    """Ray's command-line tool beside this interpreter, if Ray is installed here."""
    found = shutil.which("ray", path=str(Path(sys.executable).parent))
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RayHead:
    def __init__(self, num_cpus: int = 2) -> None:
        cli = ray_cli()
        if cli is None:
            raise RuntimeError("Ray is not installed here: pip install 'offload[ray]'")
        self.cli = cli
        self.num_cpus = num_cpus
        # Short: Ray's socket paths live below it, and a socket path has ~107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="ray-")
        self.dashboard_port = _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.log = Path(self.temp_dir) / "start.log"

    def start(self) -> RayHead:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        cmd = [self.cli, "start", "--head", f"--num-cpus={self.num_cpus}", "--num-gpus=0",
               "--disable-usage-stats", "--include-dashboard=true",
               "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dashboard_port}", f"--port={_free_port()}",
               f"--temp-dir={self.temp_dir}", "--object-store-memory=100000000"]
        with open(self.log, "wb") as out:
            code = subprocess.call(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, timeout=START_TIMEOUT_S)
        if code != 0:
            self.stop()
            raise RuntimeError(f"ray start failed ({code}): {self.log.read_text()[-2000:]}")
        self._wait_for_jobs_api()
        return self

    def _wait_for_jobs_api(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        probe = json.dumps({"entrypoint": "true", "submission_id": "offload-probe"}).encode()
        while time.monotonic() < deadline:
            try:  # a job submitted: its agent is up too, not only the dashboard
                request = urllib.request.Request(f"{self.address}/api/jobs/", probe,
                                                 {"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=30):
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"Ray's Jobs API did not answer at {self.address}")

    def stop(self) -> None:
        subprocess.call([self.cli, "stop", "--force"], stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
