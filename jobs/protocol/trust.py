"""Whose files Offload trusts, and the files it makes its owner's only: the umask of every
process it starts, the accounts taken as its own, and the checks of a way (links, folders
another account owns) and of a settings file before either is used. The standard library
only, as the rest of the protocol: runners call it too."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import sys

from jobs.protocol import ROOT

log = logging.getLogger(__name__)

PRIVATE_UMASK = 0o077  # every process Offload starts creates files 0600, folders 0700
# A settings line that gives a secret: the model server's key, the API's token, or a model
# server's address with a password in it (in any case, as the settings read names).
SECRET_SETTING = re.compile(
    rb"^[ \t]*(?:export[ \t]+)?(?:(?:OPENAI_API_KEY|OFFLOAD_API_TOKEN)[ \t]*=[ \t]*['\"]?[^\s'\"#]"
    rb"|OPENAI_BASE_URL[ \t]*=[ \t]*['\"]?[a-z][a-z0-9+.-]*://[^\s/?#'\"]*@)", re.I | re.M)


# The marks that turn the text's direction around (U+202E shows "exe.txt" as "txt.exe").
DIRECTION_MARKS = "\u202a-\u202e\u2066-\u2069"
# Control characters too: a name another account gave a file could clear the terminal,
# or start a line of its own in a file the message is written to.
_UNPRINTABLE = re.compile(f"[\x00-\x1f\x7f-\x9f{DIRECTION_MARKS}]")


def written_out(found: re.Match[str]) -> str:
    """A character found, written out: `\\x1b`, `\\u202e`."""
    code = ord(found.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def named(path: object) -> str:
    """A path in a message, its unprintable characters written out (see `written_out`)."""
    return _UNPRINTABLE.sub(written_out, str(path))


def private_files() -> None:
    """From now on this process creates folders 0700 and files 0600: chats, logs and
    results are their owner's only. Windows has no such modes: its ACLs decide there."""
    if os.name == "posix":
        os.umask(PRIVATE_UMASK)


def trusted_owners() -> set[int]:
    """The accounts whose files Offload takes as its own: this one, and the owner of the
    project's files (who could change the code that runs anyway: a checkout mounted
    into a container run as root, say)."""
    if sys.platform == "win32":  # no owners of that kind: the profile's ACLs decide
        return set()
    owners = {os.geteuid()}
    with contextlib.suppress(OSError):
        owners.add(os.stat(ROOT).st_uid)
    return owners


def another_in_group(gid: int) -> bool:
    """Whether an account Offload does not trust is of group `gid` (listed in it, or its
    own group): one that may write what that group may. A group of one's own (most Linux
    accounts have one) holds no other."""
    if sys.platform == "win32":  # no such groups: the profile's ACLs decide
        return False
    import grp
    import pwd

    trusted = {*trusted_owners(), 0}
    with contextlib.suppress(KeyError):  # a group no name is given for lists no one
        for name in grp.getgrgid(gid).gr_mem:
            try:
                if pwd.getpwnam(name).pw_uid not in trusted:
                    return True
            except KeyError:  # listed, yet no such account: none to write
                continue
    return any(account.pw_gid == gid and account.pw_uid not in trusted
               for account in pwd.getpwall())


def unsafe_way(path: str, what: str = "the data folder") -> str | None:
    """Why another account could send `what` at `path` (absolute) elsewhere, or swap it
    for its own, if it could: a link on the way there that is its own, or a folder on the
    way that it owns (its owner may rename what is in it). Each link is followed as the
    system would, so a link of ours to a link of theirs is seen; a part not there yet is
    taken as made by this account (a `..` after it leads back). Trusted: root and
    `trusted_owners()`."""
    if sys.platform == "win32":
        return None
    trusted = {*trusted_owners(), 0}
    pending = [part for part in path.split(os.sep) if part][::-1]  # the next on top
    here, links = os.sep, 0
    while pending:
        part = pending.pop()
        if part in (".", ".."):
            here = here if part == "." else os.path.dirname(here)
            continue
        entry = os.path.join(here, part)
        try:
            folder: os.stat_result | None = os.stat(here)
        except OSError:  # below a folder not there yet: made by this account
            folder = None
        if folder is not None and folder.st_uid not in trusted:
            return (f"the folder {named(here)} on the way belongs to another account "
                    f"(uid {folder.st_uid}), which could put {what} of its own in its place")
        # A group's folder without the sticky bit: any of the group may rename what is in it.
        if (folder is not None and folder.st_mode & stat.S_IWGRP
                and not folder.st_mode & stat.S_ISVTX and another_in_group(folder.st_gid)):
            return (f"the folder {named(here)} on the way can be written by another account "
                    f"of its group (gid {folder.st_gid}), which could put {what} of its own in "
                    f"its place: chmod g-w it, or choose another folder")
        try:
            st = os.lstat(entry)
        except OSError:  # not there yet: made by this account (a `..` may lead back)
            here = entry
            continue
        if not stat.S_ISLNK(st.st_mode):
            here = entry
            continue
        if st.st_uid not in trusted:
            return (f"{named(entry)} is a link of another account (uid {st.st_uid}), which could "
                    f"send {what} elsewhere")
        links += 1
        try:
            if links > 40:  # a loop
                raise OSError("too many links")
            target = os.readlink(entry)
        except OSError:
            return f"{named(entry)} leads through links that do not end (a loop)"
        here = os.sep if target.startswith(os.sep) else here
        pending.extend([each for each in target.split(os.sep) if each][::-1])
    return None


ENV_FILE_ENV = "OFFLOAD_ENV_FILE"  # set by the API for the supervisor: see env_file()


def env_file() -> str:
    """The `.env` file read beside the environment: the working folder's, or for a process
    the API starts (in the project's folder), the one the API read."""
    return os.path.abspath(os.environ.get(ENV_FILE_ENV) or ".env")


class UnsafeSettingsFile(Exception):
    """A settings file not to be read; the message says why."""


def read_settings_file(path: str, what: str = "a settings file") -> bytes | None:
    """The settings file at `path` (absolute; a `.env`, `schedules.toml`), or None if none
    is there; UnsafeSettingsFile if another account wrote it, could write it, or could swap
    it (see `unsafe_way`). It names the server's address, where the token goes, and the
    model server, where chats go: one left in a shared folder (/tmp) must not send them to
    another account's listener. Whose it is is read from the file opened, not from a look
    before: one put there between a look and the opening is the one read, and refused."""
    # The way even with no file there yet: its owner could put one in between.
    problem = unsafe_way(path, what)
    if problem is not None:
        raise UnsafeSettingsFile(problem)
    try:  # not blocking: a named pipe would wait for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # a pipe would not end; a folder reads as an error
        os.close(fd)
        raise OSError("not a regular file: a folder, a pipe or a device")
    with os.fdopen(fd, "rb") as f:
        if sys.platform != "win32":
            if st.st_uid not in {*trusted_owners(), 0}:
                raise UnsafeSettingsFile(f"it belongs to another account (uid {st.st_uid})")
            if st.st_mode & stat.S_IWOTH:
                raise UnsafeSettingsFile("every account can write it (chmod o-w it)")
            if st.st_mode & stat.S_IWGRP and another_in_group(st.st_gid):
                raise UnsafeSettingsFile(f"another account of its group (gid {st.st_gid}) "
                                         "can write it (chmod g-w it)")
        data = f.read()
        # Readable by a group only: shared on purpose (a service account of that group).
        if st.st_mode & stat.S_IROTH and SECRET_SETTING.search(data):
            _keep_secret(fd, path, stat.S_IMODE(st.st_mode))
        return data


def _keep_secret(fd: int, path: str, mode: int) -> None:
    """A settings file that holds a secret, made unreadable by every other account: any
    of them could read the key or the token in a `.env` made with the usual umask (0644)."""
    if sys.platform == "win32":  # no such modes: the profile's ACLs decide
        return
    private = mode & 0o770
    try:
        os.fchmod(fd, private)
    except OSError as exc:  # a file of root's or of the project's owner, say
        log.warning("%s holds a secret (a key, a token or a password) that every account "
                    "can read, and its mode could not be changed (%s): make the file yours "
                    "(chown), and it is made unreadable by them as it is read", path, exc.strerror)
        return
    log.warning("%s holds a secret (a key, a token or a password) and was readable by every "
                "account (mode %03o): it is now readable by its owner (and group) only "
                "(chmod %03o); change the secret if another account may have read it", path,
                mode, private)


def unreadable_as_settings(data: bytes) -> str | None:
    """Why a settings file's bytes cannot be read as settings, said, or None: python-dotenv
    skips a line it cannot read with a warning that names no file (and a CLI or runner
    then went on without the setting, to another server, say)."""
    return not_utf8(data) or _unreadable_line(data.decode("utf-8"))


def not_utf8(data: bytes) -> str | None:
    """Why a settings file's bytes are no UTF-8 text (saved as UTF-16 by PowerShell or
    Notepad, say), or None."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return (f"it is not UTF-8 text (byte {data[exc.start]:#04x} at position {exc.start}); "
                "save it as UTF-8 (in Notepad: Save As, Encoding UTF-8)")
    return None


def _unreadable_line(text: str) -> str | None:
    """The first line of a `.env` that python-dotenv cannot read, said, or None."""
    import io

    from dotenv.parser import parse_stream

    for binding in parse_stream(io.StringIO(text)):
        if binding.error:
            said = binding.original.string
            number = binding.original.line + said[:len(said) - len(said.lstrip())].count("\n")
            name, equals, _ = said.strip().partition("=")  # not its value: it may be a key
            named = f" ({name.strip()[:60]}=...)" if equals and name.strip() else ""
            return (f"line {number}{named} cannot be read as NAME=value: close a quote it "
                    "opens, or remove the line")
    return None


class UnreadableSettingsFile(Exception):
    """A settings file that cannot be read; the message names it and says what to do."""


def env_file_values() -> dict[str, str | None]:
    """What the `.env` read beside the environment (`env_file`) sets, read as the server's
    parser (python-dotenv) reads it; {} if there is none, nor a working folder to hold one.
    UnsafeSettingsFile ("refusing to read PATH: why") if it is not to be read,
    UnreadableSettingsFile if it cannot be."""
    try:
        path = env_file()
    except OSError:  # the working folder was deleted: it holds no .env
        return {}
    try:
        data = read_settings_file(path)
        if data is None:
            return {}
        problem = unreadable_as_settings(data)
    except UnsafeSettingsFile as exc:
        raise UnsafeSettingsFile(f"refusing to read {path}: {exc}") from None
    except OSError as exc:
        raise UnreadableSettingsFile(f"cannot read {path}: {exc.strerror or exc}; make it a "
                                     "file of settings, or set OFFLOAD_ENV_FILE to one") from None
    if problem is not None:
        raise UnreadableSettingsFile(f"cannot read {path}: {problem}")
    import io

    from dotenv import dotenv_values

    return dict(dotenv_values(stream=io.StringIO(data.decode("utf-8"))))
