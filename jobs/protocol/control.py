"""The operator's switches in the data folder, written by the API and obeyed by the
supervisor, and the supervisor's record of each schedule's newest job. Standard library
only, as the rest of the protocol.

  queue.paused                 present while the whole queue is paused: nothing launches
  queue.cap                    {"max_concurrent", "kinds", "at"}: runners alive at once, of
                               all and by kind, set while the server runs (absent:
                               OFFLOAD_MAX_CONCURRENT, OFFLOAD_KIND_CAPS)
  schedules/<name>.paused      present while that schedule creates no jobs
  schedules/<name>.json        {"slot", "job_id", "every_s" or "cron"}: the newest slot of that
                               schedule whose job was created; the leader writes it
  launcher.problem             {"problem", "at"}: present while the leader's launcher cannot
                               run jobs (a Ray head nobody answers at); the leader writes it
  supervisor.json              {"pid", "settings", "at"}: the leader's settings that every
                               process of the folder must share (`Settings.shared`)

A file per switch, created or removed whole: two API workers pausing two schedules at
once never overwrite each other's choice, and every write is atomic.
"""

from __future__ import annotations

import contextlib
import errno
import os

from jobs.protocol import (
    NO_FILE_TO_READ,
    CorruptJobFile,
    now_iso,
    read_json,
    read_json_or_none,
    write_json,
)
from jobs.protocol.files import not_a_folder

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from jobs.protocol import StrPath

QUEUE_PAUSED_FILE = "queue.paused"
QUEUE_CAP_FILE = "queue.cap"
MAX_CAP = 1024  # as OFFLOAD_MAX_CONCURRENT's bound
SCHEDULES_FOLDER = "schedules"
LAUNCHER_PROBLEM_FILE = "launcher.problem"
LEADER_FILE = "supervisor.json"


# The records read above that are taken as absent where damaged, and what to do then.
DAMAGE_ADVICE = {
    QUEUE_CAP_FILE: "the caps set while the server runs are not in force (the settings' "
                    "are): set them again (PUT /api/queue/cap) or remove it",
    LAUNCHER_PROBLEM_FILE: "remove it: the leading supervisor writes there what keeps its "
                           "launcher from running jobs",
    LEADER_FILE: "remove it: the leading supervisor writes its settings there, which this "
                 "API checks against its own",
}


def damaged(data_dir: StrPath) -> list[str]:
    """Those of the records above that are there but hold none (a folder in a file's
    place, a file that is no JSON object), and a file in the schedules folder's place,
    each in words with what to do."""
    said = []
    for name, advice in DAMAGE_ADVICE.items():
        path = os.path.join(data_dir, name)
        try:
            read_json(path)
        except CorruptJobFile as exc:
            why = str(exc).removeprefix(f"{name}: ")
        except OSError as exc:
            why = exc.strerror or str(exc)
        else:
            continue
        said.append(f"{path} is damaged ({why}): {advice}")
    folder = os.path.join(data_dir, SCHEDULES_FOLDER)
    if not_a_folder(folder):
        said.append(f"{folder} is no folder, so whether a schedule is paused cannot be told "
                    "and no schedule creates jobs: move it away (the pauses it held are lost)")
    return said


def queue_paused(data_dir: StrPath) -> bool:
    return os.path.exists(os.path.join(data_dir, QUEUE_PAUSED_FILE))


def set_queue_paused(data_dir: StrPath, paused: bool) -> None:
    _switch(os.path.join(data_dir, QUEUE_PAUSED_FILE), paused)


def queue_caps(data_dir: StrPath) -> tuple[int | None, dict[str, int]]:
    """The caps on runners set while the server runs: on all of them (None:
    OFFLOAD_MAX_CONCURRENT's), and by kind (a kind not named: OFFLOAD_KIND_CAPS's). A
    value edited by hand into none is left alone."""
    saved = _read(os.path.join(data_dir, QUEUE_CAP_FILE))
    if not isinstance(saved, dict):
        return None, {}
    kinds = saved.get("kinds")
    return _cap(saved.get("max_concurrent")), {
        kind: cap for kind, value in (kinds.items() if isinstance(kinds, dict) else ())
        if (cap := _cap(value)) is not None}


def _cap(value: object) -> int | None:
    return value if type(value) is int and 1 <= value <= MAX_CAP else None


def set_queue_cap(data_dir: StrPath, cap: int | None, kind: str | None = None) -> None:
    """Cap the runners alive at once at `cap`, of one kind or of all; None: back to
    OFFLOAD_KIND_CAPS's for that kind, or OFFLOAD_MAX_CONCURRENT. (Callers in several
    processes hold `queue_cap_lock` around it.)"""
    path = os.path.join(data_dir, QUEUE_CAP_FILE)
    overall, kinds = queue_caps(data_dir)
    if kind is None:
        overall = cap
    elif cap is None:
        kinds.pop(kind, None)
    else:
        kinds[kind] = cap
    if overall is None and not kinds:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    saved: dict[str, Any] = {"max_concurrent": overall} if overall is not None else {}
    write_json(path, {**saved, **({"kinds": kinds} if kinds else {}), "at": now_iso()},
               durable=True)


def queue_cap_lock(data_dir: StrPath) -> str:
    """The lock file that serialises changes to the caps (read, changed, written)."""
    return os.path.join(data_dir, QUEUE_CAP_FILE + ".lock")


def launcher_problem(data_dir: StrPath) -> str | None:
    """What keeps the leading supervisor's launcher from running jobs now, in words."""
    saved = _read(os.path.join(data_dir, LAUNCHER_PROBLEM_FILE))
    problem = saved.get("problem") if isinstance(saved, dict) else None
    return problem if isinstance(problem, str) and problem else None


def set_launcher_problem(data_dir: StrPath, problem: str | None) -> None:
    """Not durable: a supervisor removes what an earlier one left as it starts."""
    _put(os.path.join(data_dir, LAUNCHER_PROBLEM_FILE),
         {"problem": problem, "at": now_iso()} if problem else None)


def leader_settings(data_dir: StrPath) -> dict[str, Any] | None:
    """The settings the leading supervisor runs with (`Settings.shared`), if it said."""
    saved = _read(os.path.join(data_dir, LEADER_FILE))
    settings = saved.get("settings") if isinstance(saved, dict) else None
    return settings if isinstance(settings, dict) else None


def leader_pid(data_dir: StrPath) -> int | None:
    """The leading supervisor's process id, if it said."""
    saved = _read(os.path.join(data_dir, LEADER_FILE))
    pid = saved.get("pid") if isinstance(saved, dict) else None
    return pid if isinstance(pid, int) and not isinstance(pid, bool) else None


def set_leader_settings(data_dir: StrPath, settings: dict[str, Any] | None) -> None:
    """Said by a supervisor as it starts to lead (None: as it leaves)."""
    _put(os.path.join(data_dir, LEADER_FILE), None if settings is None else
         {"pid": os.getpid(), "settings": settings, "at": now_iso()})


def schedule_paused(data_dir: StrPath, name: str) -> bool:
    """Raises OSError where it cannot be told (a file in the schedules folder's place,
    which it names): a paused schedule must not create jobs."""
    try:
        os.stat(_schedule_file(data_dir, name, ".paused"))
    except (FileNotFoundError, NotADirectoryError):
        folder = os.path.join(data_dir, SCHEDULES_FOLDER)
        if not_a_folder(folder):  # on Windows too, where the stat finds no file
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), folder) from None
        return False
    return True


def set_schedule_paused(data_dir: StrPath, name: str, paused: bool) -> None:
    os.makedirs(os.path.join(data_dir, SCHEDULES_FOLDER), exist_ok=True)
    _switch(_schedule_file(data_dir, name, ".paused"), paused)


def last_fired(data_dir: StrPath, name: str) -> dict[str, Any] | None:
    """The newest slot created for schedule `name`: {"slot", "job_id"} and its timing
    (`Schedule.timing`: "every_s", or "cron" and "timezone")."""
    return read_json_or_none(_schedule_file(data_dir, name, ".json"))


def record_fired(data_dir: StrPath, name: str, slot: int, job_id: str | None,
                 timing: dict[str, Any]) -> None:
    """`job_id`: the newest job the schedule created, that slot's or, for a slot without
    a job (a new cron series starts with its next time), an earlier one's (None: none)."""
    os.makedirs(os.path.join(data_dir, SCHEDULES_FOLDER), exist_ok=True)
    write_json(_schedule_file(data_dir, name, ".json"),
               {"slot": slot, "job_id": job_id, **timing, "at": now_iso()}, durable=True)


def _schedule_file(data_dir: StrPath, name: str, suffix: str) -> str:
    # Names are checked where schedules are read (lowercase letters, digits, - and _).
    return os.path.join(data_dir, SCHEDULES_FOLDER, name + suffix)


def _switch(path: str, on: bool) -> None:
    _put(path, {"at": now_iso()} if on else None, durable=True)


def _put(path: str, record: dict[str, Any] | None, durable: bool = False) -> None:
    """`record` written whole, or the file removed (None)."""
    if record is not None:
        write_json(path, record, durable=durable)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _read(path: str) -> Any:
    """The file's JSON; None where there is none, or it is no JSON."""
    try:
        return read_json_or_none(path)
    except OSError as exc:
        if exc.errno not in NO_FILE_TO_READ:
            raise
        return None
