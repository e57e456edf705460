"""`python -m bench [suite ...]`: run the benchmarks, write bench/results/<suite>.md."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import api, core, durability, events, http, llm, ray, scale, soak, train

RESULTS = Path(__file__).resolve().parent / "results"
Run = Callable[[], dict[str, Any]]
Report = Callable[[dict[str, Any]], str]
Plot = Callable[[dict[str, Any], Path], None]
SUITES: dict[str, tuple[Run, Report, Plot | None]] = {
    "core": (core.run, core.report, None),
    "api": (api.run, api.report, api.plot),
    "llm": (llm.run, llm.report, None),
    "train": (train.run, train.report, None),
    "scale": (scale.run, scale.report, None),
    "soak": (soak.run, soak.report, soak.plot),
    "ray": (ray.run, ray.report, None),
    "durability": (durability.run, durability.report, None),
    "http": (http.run, http.report, None),
    "events": (events.run, events.report, None),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("suites", nargs="*", help=f"any of: {', '.join(SUITES)} (default: all)")
    args = parser.parse_args(argv)
    unknown = set(args.suites) - SUITES.keys()
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(sorted(unknown))}; known: {', '.join(SUITES)}")
    RESULTS.mkdir(exist_ok=True)
    machine = f"{platform.system()} {platform.machine()}, Python {platform.python_version()}"
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        # Then every new interpreter (a spare, an exec'd runner) compiles the project's
        # modules from source: slower than on a user's machine.
        machine += ", PYTHONDONTWRITEBYTECODE set (no bytecode cache)"
        print("PYTHONDONTWRITEBYTECODE is set: new interpreters compile the project from "
              "source, slower than a user's; unset it for the figures a user sees",
              file=sys.stderr)
    for name in args.suites or list(SUITES):
        run, report, plot = SUITES[name]
        print(f"running {name} ...", file=sys.stderr)
        results = run()
        table = report(results)
        if plot is not None:
            plot(results, RESULTS / f"{name}.png")
            table += f"\n\n![{name}]({name}.png)"
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        text = f"# Benchmark: {name}\n\n{stamp}, {machine}\n\n{table}\n"
        (RESULTS / f"{name}.md").write_text(text, encoding="utf-8")
        (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
        print(text)
    write_report()
    return 0


def write_report() -> Path:
    """bench/results/report.md: every suite's latest table on one page."""
    parts = ["# Offload benchmark report",
             "Made by `python -m bench`; each section is that suite's latest run "
             "(`python -m bench <suite>` runs one again)."]
    for name in SUITES:
        path = RESULTS / f"{name}.md"
        if path.exists():
            body = path.read_text(encoding="utf-8").split("\n", 1)[1]
            parts.append(f"## {name}\n{body.strip()}")
        else:
            parts.append(f"## {name}\n\nnot run yet: `python -m bench {name}`")
    report = RESULTS / "report.md"
    report.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    sys.exit(main())
