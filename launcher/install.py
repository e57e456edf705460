"""The project and its extras installed into .venv, again only when pyproject.toml
changed; the optional extras as steps whose failure never stops the launch."""

from __future__ import annotations

import hashlib
import json
import sys

from launcher import ROOT, say, venv
from launcher.llama import install_llm, install_llm_server
from launcher.venv import pip


def project_hash() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def read_stamp() -> dict[str, object]:
    """What the last install did (`venv.STAMP`, read there: tests move it)."""
    try:
        data = json.loads(venv.STAMP.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def install(extras: set[str]) -> None:
    """Install what `extras` needs, unless the stamp says it is already there."""
    stamp = read_stamp()
    current = project_hash()
    have = set(stamp.get("extras", [])) if stamp.get("hash") == current else set()  # type: ignore[call-overload]
    if extras <= have and stamp.get("hash") == current:
        return
    wanted = sorted(extras | have)
    base = [e for e in wanted if e not in OPTIONAL]
    target = f".[{','.join(base)}]" if base else "."
    say(f"installing Offload ({target})")
    # "compat": a plain path entry; the default editable finder slows every start.
    if pip("install", "-q", "-e", target, "--config-settings", "editable_mode=compat") != 0:
        sys.exit("[offload] installing the project failed; see the pip output above")
    done = {name: stamp.get(name) if stamp.get("hash") == current else None for name in OPTIONAL}
    for name in [name for name in OPTIONAL if name in extras]:
        if done[name] != "ok":
            try:
                done[name] = OPTIONAL[name]()
            except Exception as exc:  # an optional step never stops the launch
                say(f"{name}: could not be installed ({exc}); Offload starts without it")
                done[name] = "failed"
    venv.STAMP.write_text(json.dumps({"hash": current, "extras": wanted, **done}), encoding="utf-8")


def install_ray() -> str:
    """Ray, to run the Ray launcher's tests and benchmark against a head on this machine
    (the API itself only speaks HTTP to a cluster). Optional: where Ray has no wheels,
    its tests skip."""
    if pip("install", "-q", "-e", ".[ray]", "--config-settings", "editable_mode=compat") == 0:
        return "ok"
    say("Ray could not be installed here (it has no wheels for every platform); the Ray "
        "launcher's tests will skip. Offload itself does not need it.")
    return "failed"


# Extras installed as separate steps whose failure never stops the launch.
# In this order: llm-server needs llm's wheel.
OPTIONAL = {"llm": install_llm, "llm-server": install_llm_server, "ray": install_ray}
