"""Periodic schedules from configuration: `schedules.toml` in the working folder, or the
file OFFLOAD_SCHEDULES_FILE names. Read by the API (which refuses to start on a bad file)
and by the supervisor (which creates the jobs), and read again by each when it changes:
an edit that cannot be used keeps the last good schedules and says why (`ScheduleFile`).

    [retrain]
    kind = "train"
    every = "6h"        # "90s", "30m", "6h", "1d", or a number of seconds (at least 1)
    input = {}
    priority = 0        # optional
    timeout_s = 1800    # optional; else OFFLOAD_JOB_TIMEOUT_S

    [nightly]
    kind = "train"
    cron = "30 2 * * *" # instead of `every`: minute hour day month weekday, or @daily...
    timezone = "Europe/Berlin"  # optional, of `cron`'s times; else UTC

Time is cut into slots: of `every` seconds since the epoch, or from each of `cron`'s times
to the next. Each slot gets at most one job, whose id is derived from the schedule's name,
its timing and the slot, so a restart or a second supervisor never creates it twice.
Nothing about the next run is kept in memory: slots missed while nothing ran are one job,
created at the next start.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import sys
import threading
import time
import zoneinfo
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from croniter import CroniterBadDateError, croniter

from jobs import protocol as p
from jobs.kinds import InvalidInput, registry, validate_input
from jobs.protocol.trust import UnsafeSettingsFile, read_settings_file
from jobs.settings import MAX_PRIORITY, MAX_TIMEOUT_S, Settings, get_settings

if TYPE_CHECKING:
    from collections.abc import Callable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the same parser, as a package, before 3.11
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

log = logging.getLogger(__name__)

NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # a file name on every system, and a URL part
# ... but for these, which Windows takes for devices whatever follows them (nul.json).
WINDOWS_DEVICES = frozenset({"con", "prn", "aux", "nul", *(f"com{n}" for n in range(1, 10)),
                             *(f"lpt{n}" for n in range(1, 10))})
MIN_EVERY_S = 1.0
MAX_EVERY_S = 36500 * 86400.0  # a hundred years: its next run is still a date
FIELDS = ("kind", "every", "cron", "timezone", "input", "priority", "timeout_s")
# Cron's own names for its common times (not @reboot: a schedule runs by the clock).
CRON_NAMES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
MINUTE_S = 60  # a cron schedule's slots are whole minutes since the epoch
EXAMPLE = '[retrain]\nkind = "train"\nevery = "6h"\ninput = {}'
RELOAD_CHECK_S = 1.0  # how often a process looks whether the file changed (one stat)


class ScheduleError(ValueError):
    """A schedules file that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class Schedule:
    name: str
    kind: str
    every_s: float | None  # None: at the times `cron` gives
    input: dict[str, Any]
    priority: int | None = None  # None: the kind's default
    timeout_s: float | None = None  # None: OFFLOAD_JOB_TIMEOUT_S
    cron: str | None = None  # five fields, or one of CRON_NAMES
    timezone: str | None = None  # of cron's times (None: UTC)

    def slot(self, now: float) -> int:
        """The slot `now` falls in: with `cron`, the minute of its latest time."""
        if self.every_s is not None:
            return math.floor(now / self.every_s)
        # Just after the minute `now` falls in, so that a time on that minute is its own.
        return round(self._cron_time(math.floor(now / MINUTE_S) * MINUTE_S + 1, False)
                     / MINUTE_S)

    def next_slot(self, slot: int) -> int:
        if self.every_s is not None:
            return slot + 1
        return round(self._cron_time(slot * MINUTE_S, True) / MINUTE_S)

    def starts(self, slot: int) -> float:
        return slot * (self.every_s if self.every_s is not None else MINUTE_S)

    def timing(self) -> dict[str, Any]:
        """What the record of its newest slot says of its timing: a change of timing
        starts its slots anew."""
        if self.every_s is not None:
            return {"every_s": self.every_s}
        return {"cron": self.cron, "timezone": self.timezone or "UTC"}

    def _cron_time(self, at: float, forward: bool) -> float:
        """Cron's next time after `at`, or its latest before (a POSIX time)."""
        assert self.cron is not None
        times = croniter(self.cron, datetime.fromtimestamp(at, _zone(self.timezone)))
        return float(times.get_next(float) if forward else times.get_prev(float))

    def has_job(self, fired: dict[str, Any], slot: int) -> bool:
        """Whether the record of its newest slot (`control.last_fired`) covers `slot`: that
        slot, or the next (the clock set back a little). One further ahead was fired while
        the clock was ahead (a wrong clock at boot, before NTP): covering every slot
        until the clock caught up, it stopped the schedule for as long. Its slots' jobs
        have ids of their own, so one created again is found, not made twice."""
        newest = fired.get("slot")
        return self.same_timing(fired) and isinstance(newest, int) and newest in (
            slot, self.next_slot(slot))

    def same_timing(self, fired: dict[str, Any]) -> bool:
        """Whether a record of its newest slot is of this timing (else a new series)."""
        return all(fired.get(key) == value for key, value in self.timing().items())

    def job_id(self, slot: int) -> str:
        """The id of the slot's job: the same in every process, a job id as any other."""
        timing = (repr(self.every_s) if self.every_s is not None
                  else f"cron {self.cron} {self.timezone or 'UTC'}")
        seed = f"schedule\n{self.name}\n{timing}\n{slot}".encode()
        return hashlib.sha256(seed).hexdigest()[:32]


def _zone(name: str | None) -> tzinfo:
    # UTC without the time zone database, which Windows lacks unless tzdata is installed.
    return timezone.utc if name in (None, "UTC") else ZoneInfo(name)


def parse_every(value: object) -> float:
    """'6h' -> 21600.0; a number is seconds. Raises ValueError saying what is accepted."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # no OverflowError, and the sign kept: -2e301 is too small, not too large
        seconds = (float(value) if abs(value) < 2 ** 1000
                   else math.inf if value > 0 else -math.inf)  # NaN: -inf, no number
    elif isinstance(value, str) and (given := p.duration_s(value)) is not None:
        seconds = given
    else:
        raise ValueError(f"`every` must be a number of seconds or a string such as "
                         f"\"90s\", \"30m\", \"6h\" or \"1d\", not {_shown(value)}")
    if not math.isnan(seconds) and seconds > MAX_EVERY_S:  # 1e308 in hours is infinite
        raise ValueError(f"`every` must be at most \"36500d\" (a hundred years), not "
                         f"{_shown(value)}")
    if not math.isfinite(seconds) or seconds < MIN_EVERY_S:
        raise ValueError(f"`every` must be at least {MIN_EVERY_S:g} s, not {_shown(value)}")
    return seconds


def parse_cron(expression: object, zone: object) -> tuple[str, str | None]:
    """A cron expression (its fields joined by one space) and its time zone (None: UTC),
    checked; raises ValueError saying what is accepted."""
    fields = expression.lower().split() if isinstance(expression, str) else []
    if not (_crontab_fields(fields) or (len(fields) == 1 and fields[0] in CRON_NAMES)) \
            or not croniter.is_valid(" ".join(fields)):
        raise ValueError("`cron` must be five fields, minute hour day month weekday (e.g. "
                         "\"30 2 * * *\": at 02:30 each day; \"*/15 * * * mon-fri\"; each "
                         "of numbers, *, lists, ranges and steps), or one of "
                         f"{', '.join(CRON_NAMES)}, not {_shown(expression)}")
    cron = " ".join(fields)
    if zone is not None and (not isinstance(zone, str) or zone not in _zone_names()):
        raise ValueError(f"`timezone` must be a time zone's name, such as \"UTC\" or "
                         f"\"Europe/Berlin\", not {_shown(zone)}")
    zone = None if zone == "UTC" else zone
    try:
        croniter(cron, datetime.now(_zone(zone))).get_next(float)
    except CroniterBadDateError:
        raise ValueError(f"`cron` {_shown(expression)} names no time that comes (such as the "
                         "30th of February)") from None
    return cron, zone


# Crontab's own field syntax: croniter's extensions (R, H, L, W, #, ?) are refused, as a
# random or hashed time would differ from one look to the next.
_CRON_FIELD = re.compile(r"[0-9a-z*,/-]+")  # and letters only in the names below
_CRON_WORDS = ((), (), (), ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep",
                            "oct", "nov", "dec"), ("sun", "mon", "tue", "wed", "thu", "fri", "sat"))
MAX_CRON_CHARS = 200


def _crontab_fields(fields: list[str]) -> bool:
    return (len(fields) == 5 and sum(map(len, fields)) <= MAX_CRON_CHARS
            and all(_CRON_FIELD.fullmatch(field)
                    and set(re.findall("[a-z]+", field)) <= set(words)
                    for field, words in zip(fields, _CRON_WORDS, strict=True)))


@cache
def _zone_names() -> frozenset[str]:
    # The host's "localtime" names no zone another machine would read the same.
    return frozenset(zoneinfo.available_timezones() - {"localtime"}) | {"UTC"}


def _shown(value: object) -> str:
    """A value as an error message quotes it: at most about a line."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:80]}... ({len(text)} characters)"


def load(path: Path) -> tuple[Schedule, ...]:
    """The schedules of a TOML file, each checked; none when the file does not exist."""
    return parse(path, read(path))


def read(path: Path) -> bytes | None:
    """A schedules file's bytes; None when it does not exist."""
    try:
        return read_settings_file(os.path.abspath(path), "a schedules file")
    except UnsafeSettingsFile as exc:  # it would have this account run its jobs, with its keys
        raise ScheduleError(f"refusing to read the schedules file {os.path.abspath(path)}: "
                            f"{exc}") from None
    except OSError as exc:
        raise ScheduleError(f"cannot read the schedules file {path}: {exc}") from None


def parse(path: Path, data: bytes | None) -> tuple[Schedule, ...]:
    """The schedules of the file `path` whose bytes are `data`, each checked."""
    if data is None:
        return ()
    try:
        tables = tomllib.loads(data.decode("utf-8-sig"))  # Notepad's BOM too
    except (ValueError, RecursionError) as exc:  # ValueError: not TOML, not UTF-8
        raise ScheduleError(f"cannot read the schedules file {path}: {exc}") from None
    schedules = []
    for name, table in tables.items():
        try:
            schedules.append(_schedule(name, table))
        except ValueError as exc:
            raise ScheduleError(f"{path}, schedule [{name}]: {exc}") from None
    return tuple(schedules)


def _schedule(name: str, table: object) -> Schedule:
    if not isinstance(table, dict):
        raise ValueError(f"each schedule is a table, e.g.\n{EXAMPLE}")
    if not NAME.fullmatch(name):
        raise ValueError("a schedule's name is 1 to 64 lowercase letters, digits, - and _, "
                         "starting with a letter or digit")
    if name in WINDOWS_DEVICES:
        raise ValueError(f"a schedule's name cannot be {name}, the name of a device on "
                         "Windows; call it another")
    unknown = sorted(set(table) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field {', '.join(unknown)}; a schedule has: "
                         f"{', '.join(FIELDS)}")
    kind = table.get("kind")
    if not isinstance(kind, str) or kind not in registry():
        raise ValueError(f"unknown job kind {kind!r}; known kinds: {', '.join(sorted(registry()))}")
    if ("every" in table) == ("cron" in table):
        raise ValueError('give `every` (e.g. every = "6h") or `cron` (e.g. cron = "30 2 * * *"), '
                         "one of them")
    if "timezone" in table and "cron" not in table:
        raise ValueError("`timezone` goes with `cron` (`every` counts from the epoch)")
    every_s = parse_every(table["every"]) if "every" in table else None
    cron, zone = parse_cron(table["cron"], table.get("timezone")) if "cron" in table else (
        None, None)
    job_input = table.get("input", {})
    if not isinstance(job_input, dict):
        raise ValueError(f"`input` must be a table (e.g. input = {{}}), not {job_input!r}")
    try:
        job_input = validate_input(kind, job_input)
    except InvalidInput as exc:
        raise ValueError(str(exc)) from None
    priority = table.get("priority")
    if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)
                                 or abs(priority) > MAX_PRIORITY):
        raise ValueError(f"`priority` must be a whole number from {-MAX_PRIORITY} to "
                         f"{MAX_PRIORITY}, not {priority!r}")
    timeout_s = table.get("timeout_s")
    if timeout_s is not None and (isinstance(timeout_s, bool)
                                  or not isinstance(timeout_s, (int, float))
                                  or not 0 < timeout_s <= MAX_TIMEOUT_S):
        raise ValueError(f"`timeout_s` must be a number of seconds above 0 and at most "
                         f"{MAX_TIMEOUT_S:g}, not {timeout_s!r}")
    return Schedule(name, kind, every_s, job_input, priority,
                    None if timeout_s is None else float(timeout_s), cron, zone)


def from_settings(settings: Settings) -> tuple[Schedule, ...]:
    """The schedules OFFLOAD_SCHEDULES_FILE names; a file named there must exist."""
    path = settings.schedules_file
    if "schedules_file" in settings.model_fields_set and not path.is_file():
        raise ScheduleError(f"OFFLOAD_SCHEDULES_FILE names {path}, which is not a file; "
                            "create it, or unset OFFLOAD_SCHEDULES_FILE")
    return load(path)


class ScheduleFile:
    """The schedules of one file, read again once it changed (looked at no more often
    than every RELOAD_CHECK_S). A change that cannot be used keeps the last good
    schedules: `error` says why until the file is fixed, read at each look meanwhile.
    `applied(data)` is told each new set of schedules applied (its file's bytes; None: no
    file). Thread-safe."""

    def __init__(self, path: Path, schedules: tuple[Schedule, ...],
                 error: str | None = None,
                 applied: Callable[[bytes | None], None] | None = None) -> None:
        self.path = path
        self.error = error
        self._applied = applied
        self._schedules = schedules
        # `schedules` was read before any look here: the first look reads the file again.
        self._seen: tuple[int, int, int] | None = _NOT_LOOKED
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def current(self) -> tuple[Schedule, ...]:
        with self._lock:
            now = time.monotonic()
            if now - self._checked < RELOAD_CHECK_S:
                return self._schedules
            self._checked = now
            seen = _signature(self.path)
            # One in error is read at every check: a fix its stat does not show (a coarse
            # clock, a permission) or a read refused a moment (held by an editor) still applies.
            if seen == self._seen and self.error is None:
                return self._schedules
            self._seen = seen
            try:
                data = read(self.path)  # removed: no schedules
                schedules = parse(self.path, data)
            except ScheduleError as exc:
                error = f"{exc}; {LAST_GOOD_STAY}"
                if error != self.error:
                    log.error("schedules file not applied: %s", error)
                self.error = error
                return self._schedules
            # Same schedules (a comment edited, the first look after the start): kept already.
            if schedules != self._schedules or self.error is not None:
                if self._applied is not None:
                    self._applied(data)
                log.info("schedules file changed: %d schedules from %s", len(schedules),
                         self.path)
            self.error = None
            self._schedules = schedules
            return schedules


_NOT_LOOKED = (-1, -1, -1)  # no file's signature
LAST_GOOD_STAY = "the last good schedules stay until the file is fixed"


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is written, replaced or removed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


@cache
def schedule_file() -> ScheduleFile:
    """This process's schedules file, read at first use: raises ScheduleError if it
    cannot be used (the API then refuses to start)."""
    settings = get_settings()
    return ScheduleFile(settings.schedules_file, from_settings(settings))


def configured() -> tuple[Schedule, ...]:
    """This process's schedules, as the file says now (or as it last said usably)."""
    return schedule_file().current()


def by_name() -> dict[str, Schedule]:
    return {schedule.name: schedule for schedule in configured()}
