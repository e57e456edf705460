"""The shared watch behind `/events` (jobs/api/follow.py), in this process: one watch per
followed job, every write reaching it, and nothing left once its last follower leaves."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from jobs import protocol as p
from jobs.api import follow
from jobs.api.follow import Followed, JobWatch, Reader, file_signature, followed, stop_following
from jobs.api.routes_jobs import _follow
from jobs.store.job_store import JobNotFound
from tests.server import Event, applied

WAIT_S = 30  # a generous bound for a loaded machine, not a latency check


def _open_fds() -> int | None:
    return len(os.listdir("/proc/self/fd")) if sys.platform == "linux" else None


def _job(folder: Path, state: str = "running", step: int = 0) -> dict[str, Any]:
    job = {p.F_ID: folder.name, p.F_STATE: state, "step": step}
    p.write_json(folder / p.JOB_FILE, job)
    return job


def _reader(folder: Path) -> Reader:
    async def read(job_id: str) -> dict[str, Any]:
        data = p.read_json(folder / p.JOB_FILE)
        if data is None:
            raise JobNotFound(job_id)
        return data

    return read


def _changes(before: dict[str, Any], after: dict[str, Any]) -> str | None:
    return None if before == after else json.dumps(after)


async def _next(watch: JobWatch, version: int) -> int:
    await asyncio.wait_for(watch.wait(version, watch.beats), WAIT_S)
    return watch.version


def _follow_steps(tmp_path: Path, notify: bool) -> None:
    folder = tmp_path / ("a" * 32)
    folder.mkdir()
    _job(folder)
    read = _reader(folder)

    async def main() -> None:
        registry = Followed(linger_s=0)
        fds = _open_fds()
        path = str(folder / p.JOB_FILE)
        one = registry.join(folder.name, path, read, _changes, notify)
        two = registry.join(folder.name, path, read, _changes, notify)
        assert one is two and list(registry.watches) == [folder.name]
        assert (registry.notifier is not None) == (notify and sys.platform == "linux")
        version = one.version
        for step in range(1, 4):
            _job(folder, step=step)
            while (one.snapshot or {}).get("step") != step:
                version = await _next(one, version)
        _job(folder, "completed", 4)
        while not one.final:
            version = await _next(one, version)
        registry.leave(one)
        assert list(registry.watches) == [folder.name], "still followed by the second"
        registry.leave(two)
        await _closed(registry)
        assert registry.watches == {} and registry.notifier is None
        assert not one.running
        assert _open_fds() == fds, "the notifier's descriptor is closed with the last watch"

    asyncio.run(main())


@pytest.mark.parametrize("notify", [True, False], ids=["notified", "polled"])
def test_one_watch_sees_every_write_and_stops_with_its_last_follower(
        tmp_path: Path, notify: bool) -> None:
    _follow_steps(tmp_path, notify)


def test_a_follower_leaving_early_stops_the_watch_of_a_running_job(tmp_path: Path) -> None:
    folder = tmp_path / ("b" * 32)
    folder.mkdir()
    _job(folder)
    read = _reader(folder)

    async def main() -> None:
        registry = followed()
        assert followed() is registry, "one per event loop"
        watch = registry.join(folder.name, str(folder / p.JOB_FILE), read, _changes, True)
        await asyncio.sleep(0)
        assert watch.running
        registry.leave(watch)
        await asyncio.sleep(0)
        assert not watch.running and registry.watches == {}
        assert registry.notifier is not None, "kept a while for the next job followed"
        await stop_following()  # as the app does when it stops
        assert registry.notifier is None
        assert asyncio.get_running_loop() not in follow._by_loop, "dropped once closed"

    asyncio.run(main())


def test_a_removed_job_ends_its_watch(tmp_path: Path) -> None:
    folder = tmp_path / ("c" * 32)
    folder.mkdir()
    _job(folder)
    read = _reader(folder)

    async def main() -> None:
        registry = Followed(linger_s=0)
        watch = registry.join(folder.name, str(folder / p.JOB_FILE), read, _changes, True)
        shutil.rmtree(folder)  # pruned while followed
        await asyncio.wait_for(watch.wait(watch.version, watch.beats), WAIT_S)
        assert watch.ended and not watch.final
        registry.leave(watch)
        await _closed(registry)
        assert registry.watches == {} and registry.notifier is None

    asyncio.run(main())


def test_a_follower_after_the_end_gets_a_watch_of_its_own(tmp_path: Path) -> None:
    """A watch that ended (its job was final, then written again by a rerun by hand)
    while a follower still drains it is replaced for a newcomer, and leaving in either
    order closes everything."""
    folder = tmp_path / ("c" * 32)
    folder.mkdir()
    _job(folder, "completed")
    read = _reader(folder)

    async def main() -> None:
        registry = Followed(linger_s=0)
        path = str(folder / p.JOB_FILE)
        _job(folder, "running")  # e.g. `python -m runners.sleep --force` by hand
        old = registry.join(folder.name, path, read, _changes, True)
        _job(folder, "completed", 1)
        while not old.ended:
            await _next(old, old.version)
        _job(folder, "running", 2)
        new = registry.join(folder.name, path, read, _changes, True)
        assert new is not old and new.running
        registry.leave(old)
        assert registry.watches == {folder.name: new}
        _job(folder, "completed", 3)
        while not new.final:
            await _next(new, new.version)
        registry.leave(new)
        await _closed(registry)
        assert registry.watches == {} and registry.notifier is None

    asyncio.run(main())


@pytest.mark.skipif(sys.platform != "linux", reason="inotify is Linux's")
def test_the_notifier_outlives_its_last_watch_a_while_then_closes_off_the_loop(
        tmp_path: Path) -> None:
    """Closing an inotify descriptor waits for the kernel (10-20 ms): a job followed
    after another within the linger reuses the notifier, and the close runs in a thread."""
    folder = tmp_path / ("d" * 32)
    folder.mkdir()
    _job(folder)
    read = _reader(folder)

    async def main() -> None:
        registry = Followed(linger_s=0.5)
        fds = _open_fds()
        path = str(folder / p.JOB_FILE)
        watch = registry.join(folder.name, path, read, _changes, True)
        notifier = registry.notifier
        assert notifier is not None and watch.notified
        registry.leave(watch)
        again = registry.join(folder.name, path, read, _changes, True)
        assert registry.notifier is notifier, "followed again within the linger: reused"
        _job(folder, "completed", 1)
        while not again.final:
            await _next(again, again.version)
        registry.leave(again)
        assert registry.notifier is notifier and registry.closed is None
        await _closed(registry)
        assert registry.notifier is None and registry.watches == {}
        assert _open_fds() == fds, "its descriptor closed once the linger is over"

    asyncio.run(main())


def test_a_stop_ends_every_watch_and_those_joined_after_it(tmp_path: Path) -> None:
    """As the server's stop begins (`end_following`), its streams and waits end, also one
    whose route ran before the stop and joins its watch after (it held the stop for the
    server's whole grace); a server started on the loop afterwards follows jobs again."""
    folder = tmp_path / ("e" * 32)
    folder.mkdir()
    _job(folder)
    read = _reader(folder)
    path = str(folder / p.JOB_FILE)

    async def main() -> None:
        registry = followed()
        watch = registry.join(folder.name, path, read, _changes, True)
        await asyncio.sleep(0.05)
        assert not watch.ended and not follow.stopping()
        follow.end_following()
        assert follow.stopping()
        await asyncio.wait_for(watch.wait(watch.version, watch.beats), WAIT_S)
        assert watch.ended and not watch.final
        late = registry.join(folder.name, path, read, _changes, True)
        await asyncio.wait_for(late.wait(late.version, late.beats), WAIT_S)
        assert late.ended and not late.final
        registry.leave(late)
        registry.leave(watch)
        follow.start_following()
        assert not follow.stopping()
        again = registry.join(folder.name, path, read, _changes, True)
        await asyncio.sleep(0.05)
        assert not again.ended
        registry.leave(again)
        await stop_following()

    asyncio.run(main())


async def _closed(registry: Followed) -> None:
    """Until the registry's notifier, its linger over, has been closed (in a thread)."""
    for _ in range(WAIT_S * 100):
        if registry.notifier is None:
            break
        await asyncio.sleep(0.01)
    if registry.closed is not None:
        await registry.closed


class _Jobs:
    """What the events route asks of the job service, read straight from a folder."""

    def __init__(self, folder: Path) -> None:
        self.read = _reader(folder)
        self.get = self.read
        self.settings = SimpleNamespace(event_notify=True)


def _parse(text: str) -> Event:
    lines = dict(line.split(": ", 1) for line in text.strip().splitlines())
    return Event(lines.get("id"), json.loads(lines["data"]))


def test_a_follower_that_fell_behind_gets_what_it_missed_once(tmp_path: Path) -> None:
    """Two streams of one watch: one reads every event (the watch's shared ones), the
    other reads nothing until the job is final, then gets one change of its own."""
    folder = tmp_path / ("d" * 32)
    folder.mkdir()
    path = folder / p.JOB_FILE

    def write(state: str, output: str) -> None:
        p.write_json(path, {p.F_ID: folder.name, p.F_KIND: "chat", p.F_STATE: state,
                            p.F_CREATED_AT: "2026-01-01T00:00:00+00:00",
                            p.F_INPUT: {"question": "x" * 1000}, p.F_OUTPUT: output})

    write("running", "")

    async def main() -> None:
        jobs: Any = _Jobs(folder)

        async def stream() -> AsyncIterator[str]:
            job = await jobs.get(folder.name)
            return _follow(jobs, folder.name, str(path), job, file_signature(str(path)), None)

        quick, slow = await stream(), await stream()
        quick_events = [_parse(await anext(quick))]
        slow_events = [_parse(await anext(slow))]
        reply = ""
        for word in ["The ", "CPU ", "is ", "fine."]:
            reply += word
            write("running", reply)
            while applied(quick_events)[-1].get(p.F_OUTPUT) != reply:
                quick_events.append(_parse(await asyncio.wait_for(anext(quick), WAIT_S)))
        write("completed", reply)
        quick_events += [_parse(text) async for text in quick]
        slow_events += [_parse(text) async for text in slow]
        for events in (quick_events, slow_events):
            final = applied(events)[-1]
            assert final[p.F_STATE] == "completed" and final[p.F_OUTPUT] == reply
            assert [e.id for e in events][-1] == str(len(reply))
        assert len(slow_events) == 2, "what it missed, in one event"
        assert slow_events[1].fields[p.OUTPUT_DELTA] == reply
        assert all(p.F_INPUT not in e.fields for e in quick_events[1:] + slow_events[1:])
        assert followed().watches == {}

    asyncio.run(main())
