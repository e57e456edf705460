"""For `python -m runners.chat` by hand: find a model server, or start one briefly."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

from jobs import embedded
from runners.base import RunnerError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

START_TIMEOUT_S = 180.0


@contextlib.contextmanager
def temporary_server() -> Iterator[str]:
    data_dir = os.environ.get("OFFLOAD_DATA_DIR", "var")
    status = embedded.read_status(data_dir) or {}
    if status.get("ready") and status.get("base_url") and embedded.answers(str(status["base_url"])):
        yield str(status["base_url"])  # the running Offload's model
        return
    reason = embedded.unavailable_reason()
    if reason is not None:
        raise RunnerError(reason.replace("the embedded model is unavailable",
                                         "no LLM server: OPENAI_BASE_URL is not set and "
                                         "the embedded model is unavailable"))
    model = embedded.model_path()
    assert model is not None
    port = embedded.free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    print(f"starting the embedded model ({embedded.model_name(model)}) for this question...",
          file=sys.stderr)
    proc = subprocess.Popen(embedded.server_command(model, port), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not embedded.answers(base_url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RunnerError("the embedded model server did not start; run "
                                  f"`{' '.join(embedded.server_command(model, port))}` "
                                  "to see why")
            time.sleep(0.2)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
