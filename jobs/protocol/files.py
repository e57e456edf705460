"""How the job files (and every other file Offload shares between its processes) are
written and read: a write is atomic, durable where asked; a read is of a regular file
only, never through a pipe put in its place, and a log is never opened through a link.
Standard library only, as the rest of the protocol (runners import it).

The package `jobs.protocol` gives these under its own name (`p.write_json`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any, TypeAlias

    StrPath: TypeAlias = str | os.PathLike[str]

TMP_SUFFIX = ".tmp"
# fsync of creations, final states and claims. For benchmarks and tests only:
# OFFLOAD_FSYNC=0 gives up the guarantee that a 202 survives a power loss.
FSYNC = os.environ.get("OFFLOAD_FSYNC", "1") != "0"
_REPLACE_RETRY_S = 1.0  # Windows: a reader holding the file makes os.replace fail briefly
_READ_RETRIES = 5


class CorruptJobFile(Exception):
    """A job file exists but does not hold a JSON object."""


SURROGATE_HALF = re.compile("[\ud800-\udfff]")


def readable(text: str) -> str:
    """`text` with surrogate halves joined into their characters, and a half alone as
    U+FFFD: JSON escapes can carry halves (a model server's `\\ud83d`), UTF-8 cannot."""
    if SURROGATE_HALF.search(text) is None:
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def write_json(path: StrPath, data: dict[str, Any], durable: bool = False,
               sync_folder: bool = True, exclusive: bool = False) -> None:
    """Atomically replace `path`: a reader sees the old file or the new one, never half.
    `durable`: on disk before this returns; `exclusive`: FileExistsError if there is one
    (see `write_atomic`)."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    try:
        payload = text.encode()
    except UnicodeEncodeError:  # a surrogate half: written readable rather than lost
        payload = readable(text).encode()
    write_atomic(path, payload, durable, sync_folder, exclusive)


def write_atomic(path: StrPath, payload: bytes, durable: bool = False,
                 sync_folder: bool = True, exclusive: bool = False) -> None:
    """Write a temp file in the same folder, then replace `path` with it.

    `durable` (a job's creation, its final state, a claim): the temp file is
    fsync'd before the rename, so a power loss leaves the old file or the whole new one,
    never an empty one; the folder is fsync'd after it (unless `sync_folder` is False:
    the caller does it), so the rename itself survives. `exclusive` (a claim that two
    processes may make at once): made only if there is no file at `path` (else
    FileExistsError), never seen half-written (a hard link to the temp file).
    """
    folder, name = os.path.split(os.fspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{os.urandom(4).hex()}{TMP_SUFFIX}")
    durable = durable and FSYNC
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            if durable:
                f.flush()
                os.fsync(f.fileno())  # Windows: FlushFileBuffers
        if exclusive:
            _link_new(tmp, path, payload)
        else:
            _replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass  # never created, or already renamed
        raise
    if durable and sync_folder:
        sync_dir(folder)


def _link_new(tmp: str, path: StrPath, payload: bytes) -> None:
    """`tmp` made `path` if there is none (FileExistsError else), then removed."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links (FAT): made there, then written
        with open(path, "xb") as f:
            try:
                f.write(payload)
            except BaseException:
                os.unlink(path)  # no half claim left behind
                raise
    # Made: a temp file held a moment (a scanner, on Windows) is the pass's to clean.
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def sync_dir(folder: StrPath) -> None:
    """fsync a folder, so the names just created or renamed in it survive a power loss.
    POSIX only: Windows cannot open a folder for it (os.open refuses folders there)."""
    if os.name != "posix" or not FSYNC:
        return
    fd = os.open(folder or os.curdir, os.O_RDONLY)  # "": a bare file name's, the working one
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: a file system that cannot sync a folder
            raise
    finally:
        os.close(fd)


def _replace(src: StrPath, dst: StrPath) -> None:
    deadline = time.monotonic() + _REPLACE_RETRY_S
    delay = 0.001
    while True:
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            # Windows: the destination is open in a reader for a moment; try again.
            if time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def read_json(path: StrPath) -> dict[str, Any] | None:
    """Read a JSON object; None when the file does not exist.

    Retries briefly on the transient failures of a concurrent replace (Windows denies
    access for a moment); a file that stays unreadable raises `CorruptJobFile`.
    """
    last_error: Exception | None = None
    for attempt in range(_READ_RETRIES):
        try:
            raw = _read_file(path)
        except (FileNotFoundError, NotADirectoryError):  # no folder there, or a file
            return None
        except PermissionError as exc:
            last_error = exc
        else:
            try:
                data = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                last_error = exc
            except RecursionError:  # arrays in arrays, thousands deep: no job's
                raise CorruptJobFile(f"{os.path.basename(path)}: nested too deeply") from None
            else:
                if isinstance(data, dict):
                    # A half of a pair alone (`\ud800`, by hand) cannot be sent on as UTF-8.
                    return _readable_all(data) if _HALF_ESCAPE.search(raw) else data
                last_error = ValueError("not a JSON object")
        time.sleep(0.002 * (attempt + 1))
    raise CorruptJobFile(f"{os.path.basename(path)}: {last_error}") from last_error


# What `read_json` raises for a link that loops or a socket: no file behind the name,
# however often it is tried (out of file handles, say, it may be there next time). A
# reader that must list every job takes these as a damaged file; the counters' reader
# does not (zeros would read as a reset).
NO_FILE_TO_READ = frozenset({errno.ELOOP, errno.ENXIO})
# A write's failures that mean the disk (or the account's quota on it) is full.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


_HALF_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # JSON's escape of a surrogate half


def _readable_all(value: Any) -> Any:
    """`value` with every string in it `readable`."""
    if isinstance(value, str):
        return readable(value)
    if isinstance(value, list):
        return [_readable_all(each) for each in value]
    if isinstance(value, dict):
        return {readable(key): _readable_all(each) for key, each in value.items()}
    return value


def _read_file(path: StrPath) -> bytes:
    """A regular file's bytes. Opened without blocking and looked at first: a pipe put
    in a file's place would hold its reader for good."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a pipe or a device"
            raise CorruptJobFile(f"{os.path.basename(path)}: {kind}, not a file")
    except BaseException:
        os.close(fd)
        raise
    with open(fd, "rb") as f:
        return f.read()


def read_json_or_none(path: StrPath) -> dict[str, Any] | None:
    """`read_json`, with a file that stays unreadable taken as missing."""
    try:
        return read_json(path)
    except CorruptJobFile:
        return None


NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)  # not through a link put in a log's place


def not_a_folder(path: StrPath) -> bool:
    """Whether something other than a folder is where the folder `path` goes."""
    return os.path.lexists(path) and not os.path.isdir(path)


def file_in_the_way(folder: Path) -> Path | None:
    """The nearest of `folder` and the folders above it that is there, if it is no folder
    (a file, a pipe, a link to nothing): what keeps `folder` from being made or listed."""
    # os.path's: a folder on the way it may not search reads as not there, not as an error.
    there = next((each for each in (folder, *folder.parents) if os.path.lexists(each)), None)
    return None if there is None or os.path.isdir(there) else there


def read_tail(path: StrPath, max_bytes: int) -> tuple[bytes, int]:
    """The last `max_bytes` of a file and its size. Opened without waiting and without
    following a link, and a file only: a pipe in a log's place held its reader for good."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | NO_FOLLOW | getattr(os, "O_BINARY", 0)
    with open(os.open(path, flags), "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a file (a folder, a pipe or a device)")
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - max_bytes))
        return f.read(), size


def open_log(path: StrPath) -> int:
    """A job's log, opened to append to (made 0600), never through a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | NO_FOLLOW | getattr(os, "O_BINARY", 0)
    return os.open(path, flags, 0o600)


# Whether a log that a process writes through an inherited handle may be cut while it
# writes: only where that handle appends (POSIX's O_APPEND). A Windows handle goes on
# writing at its old offset, past the new end, and fills the gap with NULs.
LOGS_CUT_WHILE_WRITTEN = os.name == "posix"


def cap_log(path: StrPath, max_bytes: int) -> int:
    """Shrink a log over `max_bytes` in place to its head, a note of what was dropped,
    and its latest output; returns the bytes dropped. The runner appends (O_APPEND), so
    it goes on writing at the new end; what it writes during the cut may be lost."""
    try:
        size = os.path.getsize(path)
        if size <= max_bytes:
            return 0
        head, tail = max_bytes // 4, max_bytes // 2
        with open(os.open(path, os.O_RDWR | NO_FOLLOW), "r+b") as f:
            f.seek(max(head, size - tail))
            kept = f.read()
            note = (f"\n[... log capped at {max_bytes} bytes: older output dropped, its start "
                    f"and its latest output kept ...]\n").encode()
            f.seek(head)
            f.write(note)
            f.write(kept)
            f.truncate()
            dropped = size - head - len(kept)
    except OSError:
        return 0
    return dropped
