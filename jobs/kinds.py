"""The job kinds the API accepts: the runner module of each and the model of its input.

Add your own kind without touching this file, in either of two ways:
- a package's entry point in the group `offload.kinds`:
  `[project.entry-points."offload.kinds"] resize = "mypkg.resize"`
- the environment: `OFFLOAD_KINDS="resize=mypkg.resize,report=tools.report"`
The module must run as `python -m <module> --job-file F` (see runners/base.py); its
input is any JSON object, checked by the runner itself.

A name defined twice (a built-in kind, an entry point, OFFLOAD_KINDS) stops the API and
the supervisor at start: an installed package must never silently replace `chat`.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel, ValidationError

from jobs import protocol as p
from jobs.inputs import ChatInput, SleepInput, TrainInput
from jobs.settings import DEFAULT_PRIORITY, Settings, get_settings, problem_said

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "offload.kinds"
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
MAX_NAME_SHOWN = 40  # characters of a field's name an error repeats


@dataclass(frozen=True)
class Kind:
    module: str  # run as `python -m <module> --job-file F`
    input_model: type[BaseModel] | None = None  # None: any JSON object
    source: str = "built in"  # where it was defined, for the clash message


class UnusableKinds(ValueError):
    """Job kinds a process cannot start with; the message says what to mend."""


class KindClash(UnusableKinds):
    """Two sources define the same job kind."""


class UnknownKind(ValueError):
    def __init__(self, kind: str) -> None:
        known = ", ".join(sorted(registry()))
        super().__init__(f"unknown job kind {kind!r}; known kinds: {known}")


class InvalidInput(ValueError):
    """The job's input does not fit its kind."""


BUILT_IN: dict[str, Kind] = {
    "chat": Kind(p.BUILT_IN_KINDS["chat"], ChatInput),
    "sleep": Kind(p.BUILT_IN_KINDS["sleep"], SleepInput),
    "train": Kind(p.BUILT_IN_KINDS["train"], TrainInput),
}


def discover(env: str | None = None) -> dict[str, Kind]:
    """Built-in kinds, entry points and `env` (by default OFFLOAD_KINDS, from the
    settings); a name defined twice raises `KindClash` naming both sources."""
    kinds = dict(BUILT_IN)
    for point in entry_points(group=ENTRY_POINT_GROUP):
        dist = f"{point.dist.name} {point.dist.version}" if point.dist else "unknown"
        _add(kinds, point.name, point.value,
             f"the entry point {point.name} = {point.value} of the package {dist}")
    settings = get_settings()
    spec = settings.kinds if env is None else env
    # Over Ray, runners import on the nodes: a kind may be installed there only.
    local = settings.launcher != "ray"
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, module = (part.strip() for part in item.partition("="))
        # One's own setting: a typo stops the start (each job of it was lost at its start).
        if not _NAME.fullmatch(name) or not _MODULE.fullmatch(module):
            raise UnusableKinds(
                f"OFFLOAD_KINDS holds {item!r}, no job kind: write name=package.module (a "
                "name is a lowercase letter, then up to 63 of a-z, 0-9, - and _)")
        if local and not _findable(module):
            top = module.split(".")[0]
            raise UnusableKinds(f"OFFLOAD_KINDS holds {item!r}, but no module {top!r} can be "
                                "imported here: install it, or mend the name")
        _add(kinds, name, module, f"OFFLOAD_KINDS ({item})")
    return kinds


def _findable(module: str) -> bool:
    """Whether the top package of `module` is there to import; found without importing
    anything (a package's own code would run in the API)."""
    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def _add(kinds: dict[str, Kind], name: str, module: str, source: str) -> None:
    if not _NAME.fullmatch(name) or not _MODULE.fullmatch(module):
        log.warning("ignoring job kind %r = %r from %s: not a kind name and a module path",
                    name, module, source)
        return
    known = kinds.get(name)
    if known is not None:
        first = f"built in ({known.module})" if known.source == "built in" else known.source
        raise KindClash(f"job kind {name!r} is defined twice: {first} and {source}. "
                        "Remove one of them or register yours under another name.")
    kinds[name] = Kind(module, source=source)


@cache
def registry() -> dict[str, Kind]:
    """This process's kinds, found once; the API and the supervisor ask at start, so a
    clash stops them there. Not at import: importing never reads the settings."""
    return discover()


def runner_modules() -> dict[str, str]:
    """kind -> runner module, for the supervisor."""
    return {name: kind.module for name, kind in registry().items()}


def validate_input(kind: str, job_input: dict[str, Any]) -> dict[str, Any]:
    spec = registry().get(kind)
    if spec is None:
        raise UnknownKind(kind)
    if spec.input_model is None:  # any JSON object: plain JSON, that every reader takes
        problem = p.json_problem(job_input)
        if problem is not None:
            raise InvalidInput(f"invalid input for a {kind!r} job: {problem}")
        return job_input
    try:
        model = spec.input_model.model_validate(job_input)
    except ValidationError as exc:
        raise InvalidInput(_explain(kind, exc, spec.input_model)) from exc
    return model.model_dump(mode="json", exclude_unset=True)


def input_filled(kind: str, job_input: dict[str, Any]) -> dict[str, Any]:
    """A valid input with its kind's defaults filled in: what the runner takes it as."""
    spec = registry().get(kind)
    if spec is None or spec.input_model is None:
        return job_input
    filled = spec.input_model.model_validate(job_input).model_dump(mode="json")
    implied = getattr(spec.input_model, "implied", {})
    return {name: None if name in implied and value == implied[name] else value
            for name, value in filled.items()}


def error_location(parts: Iterable[Any]) -> str:
    """Where a pydantic error is, `input.messages.0.role`, each name cut to MAX_NAME_SHOWN
    characters: an unknown field is named, and its name may be most of a megabyte's body."""
    # Escaped where it holds what no terminal should act on (a NUL, a right-to-left
    # override), as a kind's name is.
    names = [name if name.isprintable() else name.encode("unicode_escape").decode("ascii")
             for name in map(str, parts)]
    return ".".join(name if len(name) <= MAX_NAME_SHOWN else f"{name[:MAX_NAME_SHOWN]}…"
                    for name in names)


def _explain(kind: str, exc: ValidationError, model: type[BaseModel]) -> str:
    problems = []
    for error in exc.errors()[:5]:
        where = error_location(["input", *error["loc"]])  # a key: no loc
        # Pydantic says "unable to parse raw data as a unicode string".
        said = p.NOT_TEXT if error["type"] == "string_unicode" else problem_said(error)
        problems.append(f"{where}: {said}")
    message = f"invalid input for a {kind!r} job: " + "; ".join(problems)
    if any(e["type"] == "extra_forbidden" and len(e["loc"]) == 1 for e in exc.errors()):
        message += f" (a {kind!r} job takes only: {', '.join(model.model_fields)})"
    return message


@dataclass(frozen=True)
class Launch:
    """When and how often a job runs, as its submission asks (None: the default)."""

    priority: int | None = None
    start_at: float | None = None  # a POSIX time
    max_attempts: int | None = None
    delay_s: float | None = None  # from the job's creation
    depends_on: tuple[str, ...] = ()  # the ids of the jobs that must complete first

    def fields(self, kind: str, settings: Settings, created: float) -> dict[str, Any]:
        """What the job file of a job created at `created` (a POSIX time) says of it,
        defaults filled in."""
        fields: dict[str, Any] = {
            p.F_PRIORITY: (self.priority if self.priority is not None
                           else DEFAULT_PRIORITY.get(kind, 0)),
            p.F_MAX_ATTEMPTS: self.max_attempts or settings.attempts_for(kind)}
        start_at = self.start_at if not self.delay_s else created + self.delay_s  # 0: at once
        if start_at is not None:
            fields[p.F_RUN_AT] = p.iso(start_at)
        if self.depends_on:
            fields[p.F_DEPENDS_ON] = list(self.depends_on)
        return fields
