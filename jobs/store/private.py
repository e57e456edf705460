"""Private data: what Offload keeps (chats, logs, results) is readable by its owner only.

Every process Offload starts sets the umask 0o077 (`protocol.trust.private_files`), so what
it creates is 0700 (folders) or 0600 (files) from the start. A data folder left open to
others by an earlier version is tightened once, by the first process to start (the API
or the supervisor): the data folder's own mode is set last, so a walk cut short is done
again at the next start. Windows has no modes: there the profile's ACLs decide.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
from pathlib import Path

from jobs.protocol import trust

log = logging.getLogger(__name__)

OPEN_BITS = 0o077  # group and others


class UnsafeDataFolder(RuntimeError):
    """A data folder another account could have Offload write or run through; the
    message says what to do."""


def refuse_foreign(data_dir: Path) -> None:
    """Stop if the data folder belongs to another account (one made in /tmp beforehand,
    say): its owner could put jobs in it for us to run, and links for us to write through.
    One not there yet is made here (0700), then looked at: another account may make it,
    or a folder on its way, between a look and the making."""
    if sys.platform == "win32":
        return
    trust.private_files()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # said by what writes there first (a read-only disk, a file in its place)
    problem = trust.unsafe_way(str(data_dir.absolute()))
    if problem is not None:
        raise UnsafeDataFolder(f"{problem}: set OFFLOAD_DATA_DIR to a folder of your own")
    try:
        owner = data_dir.stat().st_uid
    except OSError:
        return  # it could not be made: nothing is written there either
    if owner not in trust.trusted_owners():  # the owner of the code too (see unsafe_way)
        raise UnsafeDataFolder(f"the data folder {data_dir} belongs to another account (uid "
                           f"{owner}), which could put jobs and links in it: set "
                           "OFFLOAD_DATA_DIR to a folder of your own")


def make_private(data_dir: Path) -> None:
    """Refuse another account's data folder, set this process's umask and tighten the
    data folder if others can read it, or a folder in it."""
    refuse_foreign(data_dir)  # which sets the umask first
    opened = _opened(data_dir)
    if opened is None:
        return
    refuse_planted(data_dir, opened)
    tightened, failed = tighten(data_dir)
    refuse_planted(data_dir, opened)  # one put there while it was being tightened
    where, mode = opened
    log.warning("%s was open to other accounts (mode %03o): %d files and folders in it "
                "are now readable by their owner only (0700/0600)%s",
                f"the data folder {data_dir}" if where == str(data_dir) else where, mode,
                tightened,
                f"; {failed} could not be changed (not ours?)" if failed else "")


Opened = tuple[str, int]  # a folder other accounts may enter, and its mode


def _opened(data_dir: Path) -> Opened | None:
    """The data folder if other accounts may enter it (POSIX), else a folder in it or in
    one of its folders (a job's) that they may write, or read and is ours to tighten (its
    top tightened by hand alone, say), with its mode; None if none is."""
    if sys.platform == "win32":  # no modes
        return None
    try:
        mode = stat.S_IMODE(data_dir.stat().st_mode)
    except OSError:
        return None  # not there yet: it will be created 0700
    if mode & OPEN_BITS:
        return str(data_dir), mode
    folders, me = [str(data_dir)], os.geteuid()
    for _level in (1, 2):
        below = []
        for folder in folders:
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                try:
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # removed meanwhile
                mode = stat.S_IMODE(st.st_mode)
                # Root's 0755 folder (sudo mkdir), say, we cannot tighten: nothing put in it.
                if mode & 0o022 or (mode & OPEN_BITS and st.st_uid == me):
                    return entry.path, mode
                below.append(entry.path)
        folders = below
    return None


def refuse_planted(data_dir: Path, opened: Opened | None = None) -> None:
    """Stop if the data folder holds anything another account owns: a link of theirs
    would have Offload write where they choose, a job of theirs be run. All of it while
    a folder there is open to others (`opened`, as it was); else two levels down, all
    another account could have put there before its top was tightened by hand. The
    supervisor looks before it opens its log there."""
    if sys.platform == "win32":
        return
    opened = _opened(data_dir) if opened is None else opened
    foreign = foreign_entry(data_dir, None if opened else 2)
    if foreign is None:
        return
    path, owner = foreign
    was = ("may have been open to other accounts" if opened is None else
           f"was open to other accounts ({opened[0]}: mode {opened[1]:03o})")
    raise UnsafeDataFolder(f"the data folder {data_dir} {was} and holds {trust.named(path)}, "
                           f"which belongs to another account (uid {owner}): a link or a job of "
                           "theirs would have Offload write where they choose or run what "
                           "they put there. Look at it, remove it, then start again")


def foreign_entry(top: Path, depth: int | None = None) -> tuple[str, int] | None:
    """The first file, folder or link under `top` (`depth` levels down at most) that an
    account not trusted owns (its path and owner): while `top` was open, another account
    could put one there."""
    trusted = {*trust.trusted_owners(), 0}
    for folder, dirs, files in os.walk(top):  # links are listed, never followed
        for name in [*dirs, *files]:
            path = os.path.join(folder, name)
            try:
                owner = os.lstat(path).st_uid
            except FileNotFoundError:
                continue  # removed meanwhile
            if owner not in trusted:
                return path, owner
        if depth is not None and _level(folder, top) >= depth - 1:
            dirs.clear()  # what is in them is deeper than `depth`
    return None


def _level(folder: str, top: Path) -> int:
    return 0 if folder == str(top) else os.path.relpath(folder, top).count(os.sep) + 1


def tighten(top: Path) -> tuple[int, int]:
    """Take group and other permissions off everything under `top`, then off `top`
    itself; symbolic links are neither changed nor followed. Returns (changed, failed)."""
    changed = failed = 0
    for folder, dirs, files in os.walk(top):
        for name in [*dirs, *files]:
            path = os.path.join(folder, name)
            result = _tighten_one(path)
            changed += result == 1
            failed += result == -1
    result = _tighten_one(str(top))
    return changed + (result == 1), failed + (result == -1)


def _tighten_one(path: str) -> int:
    """1: tightened, 0: already private (or a link, or gone), -1: could not. Changed
    through a descriptor opened without following a link: a file swapped for a link
    between a look and a chmod by path had the link's target changed instead."""
    if sys.platform == "win32":
        return 0  # no modes: never called there; tells the type checker
    try:
        kind = stat.S_IFMT(os.lstat(path).st_mode)
    except FileNotFoundError:
        return 0
    if kind not in (stat.S_IFREG, stat.S_IFDIR):
        return 0  # a link, a socket (made again at each start), a pipe: left as they are
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        return 0  # removed meanwhile (a runner's temp file, say)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return 0  # a link: neither changed nor followed
        log.debug("cannot tighten %s: %s", path, exc)
        return -1
    try:
        mode = os.fstat(fd).st_mode
        if not mode & OPEN_BITS:
            return 0
        os.fchmod(fd, stat.S_IMODE(mode) & ~OPEN_BITS)
    except OSError as exc:
        log.debug("cannot tighten %s: %s", path, exc)
        return -1
    finally:
        os.close(fd)
    return 1
