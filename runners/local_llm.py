"""For `python -m runners.chat` by hand: start the embedded model briefly."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

from jobs.protocol import embedded
from runners.base import RunnerError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

START_TIMEOUT_S = 180.0


@contextlib.contextmanager
def temporary_server() -> Iterator[tuple[str, str]]:
    """A model server for this question alone: (base_url, key). A running Offload's
    server answers only the runners that Offload starts (they get its key)."""
    local_model = os.environ.get("OFFLOAD_LOCAL_MODEL")  # by hand: the environment says
    reason = embedded.unavailable_reason(local_model)
    if reason is not None:
        raise RunnerError(reason.replace("the embedded model is unavailable",
                                         "no LLM server: OPENAI_BASE_URL is not set and "
                                         "the embedded model is unavailable"))
    model = embedded.model_path(local_model)
    assert model is not None
    port, key = embedded.free_port(), embedded.new_key()
    base_url = f"http://127.0.0.1:{port}/v1"
    print(f"starting the embedded model ({embedded.model_name(model)}) for this question...",
          file=sys.stderr)
    engine = embedded.engine(os.environ.get("OFFLOAD_LLM_ENGINE", "auto"))
    command = embedded.server_command(model, engine=engine)
    proc = subprocess.Popen(command, env=embedded.server_env(port, key, engine),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        # The key goes out only once the port is known to be the server's.
        while not ((owned := embedded.owns_port({proc.pid}, port))
                   and embedded.answers(base_url, key)):
            if owned is False:
                raise RunnerError(f"another process took port {port} from the embedded "
                                  "model server; try again")
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RunnerError("the embedded model server did not start; run "
                                  f"`{' '.join(command)}` to see why")
            time.sleep(0.2)
        yield base_url, key
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
