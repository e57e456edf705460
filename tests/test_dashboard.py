"""The dashboard in a real browser: Debian's Chromium, driven by Playwright."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, wait_for, wait_job
from tests.fake_llm import FakeLLM
from tests.server import Server
from tests.test_train import record_history

pytestmark = pytest.mark.browser
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]
REPLY = ["The ", "CPU ", "is ", "busy ", "but ", "fine ", "right ", "now."]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("OFFLOAD_CHROMIUM"), "chromium", "chromium-browser",
                      "google-chrome"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium_path()
    if path is None:
        if os.environ.get("CI"):
            raise AssertionError("no Chromium on this machine: .ci/run installs Debian's")
        pytest.skip("no system Chromium here (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with FakeLLM(pieces=REPLY, delay_s=0.25) as fake:
        yield fake


@pytest.fixture
def server(make_server: Callable[..., Server], llm: FakeLLM) -> Server:
    return make_server(env={"OPENAI_BASE_URL": llm.base_url})


def updates(page: Any) -> int:
    return int(page.get_attribute("#history-chart", "data-updates") or 0)


def stored_turn(client: httpx.Client, session: str, question: str) -> dict[str, Any]:
    """A chat turn of `session` asked through the seed's endpoint, once it has ended."""
    job_id = client.post("/api/ai_chat_async", json={
        "messages": [{"role": "user", "content": question}],
        "session_id": session}).json()["job_id"]
    return wait_job(client, job_id)


def test_history_chart_stays_live_while_five_chats_stream(page: Any, server: Server) -> None:
    page.goto(server.url)
    page.wait_for_function("Number(document.querySelector('#history-chart')"
                           ".dataset.updates || 0) >= 1", timeout=15_000)
    page.evaluate(WATCH_LATE)
    with ThreadPoolExecutor(5) as pool:
        ids = list(pool.map(lambda _: httpx.post(
            f"{server.url}/api/ai_chat_async",
            json={"messages": [{"role": "user", "content": "hi"}]}).json()["job_id"],
            range(5)))
    before = updates(page)
    # An update comes a second after the last answer, and a loaded machine slows the
    # answers: five are waited for, rather than counted in a fixed 6 s.
    wait_for(lambda: updates(page) - before >= 5, 30, 0.1, "the chart's next five updates")
    pauses = page.evaluate(HISTORY_PAUSES)
    assert len(pauses) >= 4 and max(pauses) < 2000, f"asked again a second after each: {pauses}"
    assert page.evaluate("window.wentLate") is False, "no update for LATE_S meanwhile"
    assert "late" not in (page.get_attribute("#history-age", "class") or "")
    assert len(ids) == 5


# The moves and lines chart.js draws the history with: samples 25 s apart in the middle
# (Offload stopped meanwhile), CPU at 40 %, memory at 20 %.
DRAW_A_GAP = """async () => {
    const { drawHistory } = await import('/chart.js');
    const canvas = document.createElement('canvas');
    canvas.style.width = '600px';
    canvas.style.height = '200px';
    document.body.append(canvas);
    const ctx = canvas.getContext('2d');
    const drawn = [];
    for (const name of ['moveTo', 'lineTo']) {
        const real = ctx[name].bind(ctx);
        ctx[name] = (x, y) => { drawn.push([name, x, y]); real(x, y); };
    }
    const at = [0, 1, 2, 3, 4, 30, 31, 32, 33, 34].map((s) => 1e9 + s);
    drawHistory(canvas, at.map((t) => ({ t, cpu: 40, mem: 20 })), null, 300);
    canvas.remove();
    return drawn;
}"""


def test_the_history_chart_draws_no_line_across_a_time_without_samples(
        page: Any, server: Server) -> None:
    # A straight line across the 25 s Offload was stopped, as if it had measured them.
    page.goto(server.url)
    drawn = page.evaluate(DRAW_A_GAP)
    heights = Counter(y for _, _, y in drawn)
    series = [y for y, count in heights.items() if count >= 10]
    assert len(series) == 2, drawn  # CPU's and memory's
    for y in series:
        moves = [x for name, x, at in drawn if at == y and name == "moveTo"]
        assert len(moves) == 2, f"the line at {y} starts {len(moves)} times: {drawn}"


# From now on: whether #history-age is ever marked late (no update for LATE_S, app.js).
WATCH_LATE = """() => {
    const age = document.querySelector('#history-age');
    window.watchedFrom = performance.now();
    window.wentLate = age.classList.contains('late');
    new MutationObserver(() => { window.wentLate ||= age.classList.contains('late'); })
        .observe(age, {attributes: true, attributeFilter: ['class']});
}"""
# The ms from each answer for the history to the page's next request for it, since then.
HISTORY_PAUSES = """() => {
    const asked = performance.getEntriesByType('resource')
        .filter(e => e.name.includes('/api/history') && e.startTime >= window.watchedFrom);
    return asked.slice(1).map((e, i) => e.startTime - asked[i].responseEnd);
}"""


def test_chat_reply_appears_token_by_token(page: Any, server: Server) -> None:
    page.goto(server.url)
    page.fill("#chat-input", "How is the CPU?")
    page.press("#chat-input", "Enter")
    reply = page.locator("#chat-log li.msg.assistant").last
    seen: set[str] = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and reply.get_attribute("data-state") != "completed":
        seen.add(reply.inner_text())
        time.sleep(0.05)
    assert reply.get_attribute("data-state") == "completed"
    assert "The CPU is busy but fine right now." in reply.inner_text()
    growing = {text for text in seen if text.strip() and "now." not in text}
    assert len(growing) >= 3, f"the reply should appear piece by piece: {seen}"
    page.reload()
    page.wait_for_selector("#chat-log li.msg.assistant")
    assert "The CPU is busy" in page.inner_text("#chat-log"), "kept across a reload"


def test_a_chat_run_again_from_the_jobs_table_shows_in_its_conversation(
        page: Any, server: Server) -> None:
    # The re-run is the conversation's next turn, as the server lists it: the chat showed
    # it only once the page was loaded again, and took questions meanwhile.
    page.goto(server.url)
    page.fill("#chat-input", "How is the CPU?")
    page.press("#chat-input", "Enter")
    page.wait_for_selector("#chat-log li.msg.assistant[data-state='completed']",
                           timeout=30_000)
    first = page.get_attribute("#chat-log li.msg.assistant", "data-job-id")
    page.click(f"#jobs-table tr[data-job-id='{first}'] button.rerun-job")
    page.wait_for_function("document.querySelector('#rerun-input').value.includes('CPU')",
                           timeout=10_000)
    page.click("#rerun-submit")
    page.wait_for_function("document.querySelectorAll('#chat-log li.msg.assistant').length"
                           " === 2", timeout=20_000)
    again = page.get_attribute("#chat-log li.msg.assistant:last-child", "data-job-id")
    assert again not in (None, first)
    page.wait_for_selector(f"#chat-log li.msg.assistant[data-job-id='{again}']"
                           "[data-state='completed']", timeout=30_000)


def test_a_chat_waiting_in_a_paused_queue_gets_its_reply(page: Any, server: Server) -> None:
    # Its time in the queue counted as silence: after 120 s the bubble said no answer and
    # stopped following, and the reply, once the queue went on, never showed.
    assert httpx.post(f"{server.url}/api/queue/pause").json()["paused"] is True
    page.clock.install()
    page.goto(server.url)
    page.fill("#chat-input", "How is the CPU?")
    page.press("#chat-input", "Enter")
    reply = page.locator("#chat-log li.msg.assistant").last
    page.wait_for_function("document.querySelector('#chat-log li.msg.assistant:last-child')"
                           "?.dataset.jobId", timeout=20_000)
    page.clock.fast_forward("03:00")  # three minutes in the queue
    time.sleep(1)
    assert "stalled" not in (reply.get_attribute("class") or "")
    assert httpx.post(f"{server.url}/api/queue/resume").json()["paused"] is False
    page.wait_for_function("document.querySelector('#chat-log li.msg.assistant:last-child')"
                           "?.dataset.state === 'completed'", timeout=30_000)
    assert "The CPU is busy but fine right now." in reply.inner_text()


def test_a_message_waits_for_the_earlier_turns_to_load(page: Any, server: Server,
                                                       llm: FakeLLM) -> None:
    # Sent before they had loaded, it went without them (the model never heard the earlier
    # turns), and showed twice once they had.
    with server.client() as client:
        first = stored_turn(client, "slow-restore", "My name is Alice.")["id"]
    held: list[Any] = []
    page.goto(server.url)
    page.evaluate("localStorage.setItem('offload-session', 'slow-restore')")
    page.route("**/api/sessions/**", lambda route: held.append(route))
    page.reload()
    deadline = time.monotonic() + 20
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    assert held, "the page asked for the session's turns"
    assert page.is_disabled("#chat-send")
    # Nothing said why Send stayed disabled over an empty conversation.
    page.wait_for_function("document.querySelector('#chat-forget-note').textContent"
                           " === 'Loading this conversation…'", timeout=5_000)
    page.fill("#chat-input", "What is my name?")
    page.press("#chat-input", "Enter")  # not sent yet
    held[0].continue_()
    page.wait_for_selector(f"#chat-log li[data-job-id='{first}'][data-state='completed']")
    page.wait_for_function("!document.querySelector('#chat-send').disabled", timeout=20_000)
    assert page.input_value("#chat-input") == "What is my name?"
    assert page.text_content("#chat-forget-note") == ""
    page.press("#chat-input", "Enter")
    page.wait_for_function("document.querySelectorAll('#chat-log li.msg.assistant"
                           "[data-state=completed]').length === 2", timeout=30_000)
    asked = [m["content"] for m in llm.requests[-1]["body"]["messages"] if m["role"] == "user"]
    assert asked[-2:] == ["My name is Alice.", "What is my name?"], asked
    assert page.locator("#chat-log li.msg.user").count() == 2


def test_earlier_turns_that_failed_to_load_are_asked_again(page: Any, server: Server,
                                                           llm: FakeLLM) -> None:
    # One failed answer (a 503, the network) and the page went on without them: it showed
    # an empty conversation, and the next question went without the earlier turns.
    with server.client() as client:
        first = stored_turn(client, "flaky-restore", "My name is Alice.")["id"]
    asked: list[str] = []

    def fail_once(route: Any) -> None:
        asked.append(route.request.url)
        if len(asked) == 1:
            route.fulfill(status=503, content_type="application/json",
                          body='{"detail": "retry in a moment"}')
        else:
            route.continue_()

    page.route("**/api/sessions/**", fail_once)
    page.add_init_script("localStorage.setItem('offload-session', 'flaky-restore')")
    page.goto(server.url)
    page.wait_for_function("document.querySelector('#chat-forget-note').textContent"
                           ".startsWith('Could not load this conversation')", timeout=20_000)
    assert page.is_disabled("#chat-send")
    page.wait_for_selector(f"#chat-log li[data-job-id='{first}'][data-state='completed']",
                           timeout=20_000)
    assert len(asked) == 2
    assert page.text_content("#chat-forget-note") == ""
    page.wait_for_function("!document.querySelector('#chat-send').disabled", timeout=20_000)
    page.fill("#chat-input", "What is my name?")
    page.press("#chat-input", "Enter")
    page.wait_for_function("document.querySelectorAll('#chat-log li.msg.assistant"
                           "[data-state=completed]').length === 2", timeout=30_000)
    said = [m["content"] for m in llm.requests[-1]["body"]["messages"] if m["role"] == "user"]
    assert said[-2:] == ["My name is Alice.", "What is my name?"], said


def test_a_message_that_could_not_be_sent_leaves_no_banner(page: Any, server: Server) -> None:
    # Said in the banner as "Retrying…" under its own name, it stayed there once the
    # server was back, though nothing retried it.
    page.goto(server.url)
    page.wait_for_function("Number(document.querySelector('#history-chart')"
                           ".dataset.updates || 0) >= 1", timeout=15_000)
    server.stop()
    page.fill("#chat-input", "Are you there?")
    page.press("#chat-input", "Enter")
    page.wait_for_function("document.querySelector('#chat-log li.msg.assistant:last-child')"
                           "?.textContent.startsWith('Error:')", timeout=20_000)
    # Taken out of the box when sent, it was lost: it had to be typed again to retry.
    assert page.input_value("#chat-input") == "Are you there?"
    # The banner named whichever poll failed first; the Status panel showed its last
    # figures as if they were current.
    page.wait_for_selector("#status-stale", state="visible", timeout=20_000)
    assert page.text_content("#net-error") == "Cannot reach the server. Retrying…"
    stale = page.text_content("#status-stale") or ""
    assert stale.startswith("As of ") and stale.endswith("newer figures could not be read."), stale
    assert "stale" in (page.get_attribute("#status", "class") or "")
    server.start()
    page.wait_for_selector("#net-error", state="hidden", timeout=30_000)
    page.wait_for_selector("#status-stale", state="hidden", timeout=20_000)
    assert "stale" not in (page.get_attribute("#status", "class") or "")


def route_questions(page: Any, handler: Callable[[Any], Any]) -> None:
    """Route the questions the page sends (`POST /api/ai_chat_async`) to `handler`; its
    look-ups of a lost question's turn by its key (`GET`) go to the server."""
    page.route("**/api/ai_chat_async", lambda route: handler(route)
               if route.request.method == "POST" else route.continue_())


def sent_again(server: Server, route: Any) -> httpx.Response:
    """The question a route holds, as the stalled server takes it late: its body and key."""
    keyed = {name: value for name, value in route.request.headers.items()
             if name.lower() in ("content-type", "idempotency-key")}
    return httpx.post(f"{server.url}/api/ai_chat_async", headers=keyed,
                      content=route.request.post_data_buffer)


@pytest.mark.parametrize("cut", ["connection reset", "proxy timeout"])
def test_a_question_whose_answer_was_cut_shows_its_reply(page: Any, server: Server,
                                                         cut: str) -> None:
    # The connection cut after the server had taken the question: the page said "Error:
    # network error" while the reply ran on the server, shown nowhere until a reload. A
    # proxy's 504 (it gave up waiting on the server) was an error that said no more.
    def take_then_cut(route: Any) -> None:
        route.fetch()  # the server takes it
        if cut == "proxy timeout":
            route.fulfill(status=504, content_type="text/html",
                          body="<html><body><h1>504 Gateway Time-out</h1></body></html>")
        else:
            route.abort("connectionreset")

    route_questions(page, take_then_cut)
    page.goto(server.url)
    page.fill("#chat-input", "How is the CPU?")
    page.press("#chat-input", "Enter")
    completed_shown(page, 1)
    assert "The CPU is busy but fine right now." in page.inner_text("#chat-log")
    assert questions_shown(page) == ["How is the CPU?"]
    assert page.locator("#chat-log li.msg.assistant").count() == 1
    assert page.input_value("#chat-input") == "", "not to be sent again"


def routed(page: Any, routes: list[Any], what: str) -> None:
    """Wait until a route handler has put something in `routes` (the page's handlers run
    only while Playwright is called)."""
    deadline = time.monotonic() + 20
    while not routes and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    assert routes, f"timed out waiting for {what}"


def test_a_question_the_server_took_but_never_answered_shows_its_reply(
        page: Any, server: Server, llm: FakeLLM) -> None:
    # The server took the question and its answer never came: the bubble said "sending…",
    # Send stayed disabled, and the reply running on the server showed only after a reload.
    taken: list[Any] = []
    route_questions(page, lambda route: taken.append(route.fetch()))
    page.clock.install()
    page.goto(server.url)
    page.fill("#chat-input", "How is the CPU?")
    page.press("#chat-input", "Enter")
    routed(page, taken, "the question taken by the server")
    page.clock.fast_forward("01:00")
    completed_shown(page, 1)
    assert "The CPU is busy but fine right now." in page.inner_text("#chat-log")
    assert questions_shown(page) == ["How is the CPU?"]
    assert page.locator("#chat-log li.msg.assistant").count() == 1
    assert page.input_value("#chat-input") == "", "not to be sent again"
    assert len(llm.requests) == 1


def given_up_question(page: Any, server: Server, question: str) -> list[Any]:
    """`question` asked on a page just opened (its clock installed), held on its way to
    the server until the page gave it up after 30 s; the route holding it."""
    held: list[Any] = []
    route_questions(page, lambda route: held.append(route))
    page.clock.install()
    page.goto(server.url)
    page.fill("#chat-input", question)
    page.press("#chat-input", "Enter")
    routed(page, held, "the question sent")
    page.clock.fast_forward("00:31")
    page.wait_for_function("document.querySelector('#chat-log li.msg.assistant:last-child')"
                           "?.dataset.state === 'failed'", timeout=20_000)
    return held


def test_a_question_the_server_took_after_the_page_gave_up_shows_its_reply(
        page: Any, server: Server, llm: FakeLLM) -> None:
    # A server stalled past the page's 30 s stored the question after the page had looked
    # for it: its reply ran on the server, shown nowhere until a reload.
    held = given_up_question(page, server, "How is the CPU?")
    page.wait_for_timeout(1000)  # looked for once, in vain
    taken = sent_again(server, held[0])  # the stalled server takes it now, as it was sent
    assert taken.status_code == 200
    page.clock.fast_forward("02:00")
    completed_shown(page, 1)
    assert questions_shown(page) == ["How is the CPU?"]
    assert page.input_value("#chat-input") == ""
    assert len(llm.requests) == 1


def test_a_question_waiting_on_the_token_form_is_not_given_up(page: Any, server: Server) -> None:
    # The minutes spent finding the token were counted as the server's: the question was
    # given up as unanswered once the token was entered.
    refused: list[str] = []

    def refuse_once(route: Any) -> None:
        if refused:
            route.continue_()
            return
        refused.append(route.request.url)
        route.fulfill(status=401, content_type="application/json",
                      body='{"detail": "a valid API token is needed"}')

    route_questions(page, refuse_once)
    page.clock.install()
    page.goto(server.url)
    page.fill("#chat-input", "How is the CPU?")
    page.press("#chat-input", "Enter")
    page.wait_for_selector("#token-input", state="visible", timeout=15_000)
    page.clock.fast_forward("02:00")  # the token looked for
    page.fill("#token-input", "the-token")
    page.press("#token-input", "Enter")
    completed_shown(page, 1)
    assert page.locator("#chat-log li.msg.assistant").count() == 1


def test_a_question_never_answered_is_given_back_and_sent_once(
        page: Any, server: Server, llm: FakeLLM) -> None:
    # Held by a server that never answered, the question said "sending…" until a reload.
    held: list[Any] = []
    route_questions(page, lambda route: held.append(route))
    page.clock.install()
    page.goto(server.url)
    page.fill("#chat-input", "How is the CPU?")
    page.press("#chat-input", "Enter")
    routed(page, held, "the question sent")
    page.clock.fast_forward("01:00")
    page.wait_for_function("document.querySelector('#chat-log li.msg.assistant:last-child')"
                           "?.dataset.state === 'failed'", timeout=20_000)
    said = page.inner_text("#chat-log li.msg.assistant")
    assert "no answer from the server" in said, said
    assert page.input_value("#chat-input") == "How is the CPU?"
    page.unroute("**/api/ai_chat_async")
    page.wait_for_function("!document.querySelector('#chat-send').disabled", timeout=20_000)
    page.press("#chat-input", "Enter")
    page.wait_for_selector("#chat-log li.msg.assistant[data-state='completed']", timeout=30_000)
    assert len(llm.requests) == 1
    assert page.input_value("#chat-input") == ""


def test_a_question_sent_again_before_the_stalled_server_stored_it_is_one_turn(
        page: Any, server: Server, llm: FakeLLM) -> None:
    # Given up after 30 s and sent again, the question was stored twice once the stalled
    # server took the first: two turns, two replies of the model.
    held = given_up_question(page, server, "How is the CPU?")
    page.unroute("**/api/ai_chat_async")
    page.press("#chat-input", "Enter")  # sent again, as it was given back
    completed_shown(page, 1)
    assert sent_again(server, held[0]).status_code == 200  # the first, taken late
    session = page.evaluate("localStorage.getItem('offload-session')")
    turns = httpx.get(f"{server.url}/api/sessions/{session}").json()["turns"]
    assert [turn["question"] for turn in turns] == ["How is the CPU?"]
    assert questions_shown(page) == ["How is the CPU?"]
    assert len(llm.requests) == 1


def test_a_question_asked_again_once_its_lost_turn_was_found_is_a_new_turn(
        page: Any, server: Server, llm: FakeLLM) -> None:
    # A lost question's turn shown by a sync before its key was looked up stayed a failed
    # bubble too, and the same question asked again on purpose went with that old key:
    # the server answered the turn it had, and the page dropped the new question.
    held = given_up_question(page, server, "How is the CPU?")
    page.wait_for_timeout(1000)  # looked up once by its key, in vain
    page.unroute("**/api/ai_chat_async")
    assert sent_again(server, held[0]).status_code == 200  # the stalled server takes it late
    page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")  # a sync first
    completed_shown(page, 1)
    page.clock.fast_forward("02:00")  # the look-ups by key
    page.wait_for_function("!document.querySelector(\"#chat-log li.msg.assistant"
                           "[data-state='failed']\")", timeout=20_000)
    assert page.input_value("#chat-input") == ""
    page.fill("#chat-input", "How is the CPU?")  # asked again, on purpose
    page.press("#chat-input", "Enter")
    completed_shown(page, 2)
    session = page.evaluate("localStorage.getItem('offload-session')")
    turns = httpx.get(f"{server.url}/api/sessions/{session}").json()["turns"]
    assert [turn["question"] for turn in turns] == ["How is the CPU?"] * 2
    assert questions_shown(page) == ["How is the CPU?"] * 2


def test_a_lost_question_stored_after_the_pages_last_look_is_found_by_a_sync(
        page: Any, server: Server, llm: FakeLLM) -> None:
    # Stored by the stalled server after the page's last look-up of its key (at 60 s),
    # the turn a sync showed stood beside the question's failed bubble, the question still
    # in the box: sent again, with a new key, it was stored twice and the model asked twice.
    looks: list[str] = []
    page.on("request", lambda request: looks.append(request.url)
            if request.method == "GET" and request.url.endswith("/api/ai_chat_async")
            else None)
    held = given_up_question(page, server, "How is the CPU?")
    deadline = time.monotonic() + 120
    while len(looks) < 4 and time.monotonic() < deadline:  # at +0, +10, +30 and +60 s
        page.clock.fast_forward("00:05")
        page.wait_for_timeout(200)
    assert len(looks) == 4, looks
    page.wait_for_timeout(1000)  # the last look answered: not there yet
    assert sent_again(server, held[0]).status_code == 200  # the stalled server takes it late
    page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")  # back to the tab
    completed_shown(page, 1)
    page.wait_for_function("!document.querySelector(\"#chat-log li.msg.assistant"
                           "[data-state='failed']\")", timeout=20_000)
    assert questions_shown(page) == ["How is the CPU?"]
    assert page.input_value("#chat-input") == ""
    assert len(looks) == 5  # its key looked up again: the text alone did not decide
    assert len(llm.requests) == 1


def lose_a_question(page: Any, server: Server, question: str) -> None:
    """`question` asked on a page just opened, its connection cut before the server took
    it: a failed bubble, the question given back to the box."""
    route_questions(page, lambda route: route.abort("connectionreset"))  # never taken
    page.goto(server.url)
    page.fill("#chat-input", question)
    page.press("#chat-input", "Enter")
    page.wait_for_function("document.querySelector('#chat-log li.msg.assistant:last-child')"
                           "?.dataset.state === 'failed'", timeout=20_000)
    page.unroute("**/api/ai_chat_async")


def asked_in_another_tab(page: Any, server: Server, question: str) -> None:
    """`question` asked and answered in a second tab of the page's browser."""
    other = page.context.new_page()
    other.goto(server.url)
    other.wait_for_function("!document.querySelector('#chat-send').disabled", timeout=20_000)
    other.fill("#chat-input", question)
    other.press("#chat-input", "Enter")
    completed_shown(other, 1)


@pytest.mark.parametrize("where", ["this tab", "another tab"])
def test_a_lost_question_asked_again_after_other_turns_carries_them(
        page: Any, server: Server, llm: FakeLLM, where: str) -> None:
    # Asked again after another question was answered, a lost question went with its key
    # and the conversation as it was then: the model never saw the turns in between.
    # Another tab's turn is shown above the lost question (the page's turns come before
    # its own unsent ones), so the lost one still passed for the newest.
    lose_a_question(page, server, "Say hi.")
    if where == "this tab":
        page.fill("#chat-input", "My name is Alice.")
        page.press("#chat-input", "Enter")
        completed_shown(page, 1)
        page.fill("#chat-input", "Say hi.")
    else:
        asked_in_another_tab(page, server, "My name is Alice.")
        completed_shown(page, 1)  # told of it; "Say hi." was given back to the box
    page.press("#chat-input", "Enter")
    completed_shown(page, 2)
    asked = [m["content"] for m in llm.requests[-1]["body"]["messages"] if m["role"] == "user"]
    assert asked == ["My name is Alice.", "Say hi."], asked


def test_a_lost_question_is_not_stood_for_by_another_tabs_of_the_same_text(
        page: Any, server: Server, llm: FakeLLM) -> None:
    # Its answer lost, a question was looked for by its text: another tab's turn asking
    # the same stood for it, and the question, never stored, was taken out of the box.
    lose_a_question(page, server, "How is the CPU?")
    asked_in_another_tab(page, server, "How is the CPU?")
    completed_shown(page, 1)  # told of it, as of any turn of another tab
    page.wait_for_timeout(1000)
    assert page.locator("#chat-log li.msg.assistant[data-state='failed']").count() == 1
    assert page.input_value("#chat-input") == "How is the CPU?"
    page.press("#chat-input", "Enter")
    completed_shown(page, 2)
    session = page.evaluate("localStorage.getItem('offload-session')")
    turns = httpx.get(f"{server.url}/api/sessions/{session}").json()["turns"]
    assert [turn["question"] for turn in turns] == ["How is the CPU?"] * 2
    assert len(llm.requests) == 2


def test_a_question_too_long_for_the_server_is_said_and_kept(page: Any, server: Server) -> None:
    # Sent, it was refused in its bubble as "messages.0.content: String should have at most
    # 100000 characters", the whole question shown again above it.
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url)
            if "/api/ai_chat_async" in request.url else None)
    page.goto(server.url)
    question = "Why? " + "x" * 100_000
    page.fill("#chat-input", question)
    page.press("#chat-input", "Enter")
    page.wait_for_function("document.querySelector('#chat-forget-note').textContent"
                           ".includes('characters')", timeout=10_000)
    assert page.text_content("#chat-forget-note") == (
        "This question is 100,005 characters long; at most 100,000 are taken. "
        "Shorten it (it is kept in the box).")
    assert page.input_value("#chat-input") == question
    assert page.locator("#chat-log li").count() == 0 and asked == []
    page.fill("#chat-input", "x" * 100_000)
    page.press("#chat-input", "Enter")
    completed_shown(page, 1)
    assert page.text_content("#chat-forget-note") == ""


def test_a_question_taken_as_the_network_went_down_shows_its_reply_once_it_is_back(
        page: Any, server: Server, llm: FakeLLM) -> None:
    # Its answer lost and the network down, the turn was looked for at once, in vain, and
    # not again: the reply running on the server showed only after a reload.
    def take_then_go_offline(route: Any) -> None:
        route.fetch()  # the server takes it
        page.context.set_offline(True)
        route.abort("internetdisconnected")

    route_questions(page, take_then_go_offline)
    page.goto(server.url)
    page.fill("#chat-input", "How is the CPU?")
    page.press("#chat-input", "Enter")
    page.wait_for_function("document.querySelector('#chat-log li.msg.assistant:last-child')"
                           "?.dataset.state === 'failed'", timeout=20_000)
    # It said "network error" of a browser that knew it was offline.
    assert page.text_content("#chat-log li.msg.assistant .text") == (
        "Error: this browser is offline")
    page.wait_for_timeout(2000)  # looked for meanwhile, offline
    page.context.set_offline(False)
    completed_shown(page, 1)
    assert questions_shown(page) == ["How is the CPU?"]
    assert page.input_value("#chat-input") == ""
    assert len(llm.requests) == 1


def test_a_proxy_whose_server_is_down_is_said(page: Any, server: Server) -> None:
    # Behind a proxy, a server down is a 502 for every request, not a failed connection:
    # the page said nothing, its figures and table stale, as if all were well.
    page.goto(server.url)
    page.wait_for_function("Number(document.querySelector('#history-chart')"
                           ".dataset.updates || 0) >= 1", timeout=15_000)

    def bad_gateway(route: Any) -> None:
        route.fulfill(status=502, content_type="text/html",
                      body="<html><body><h1>502 Bad Gateway</h1></body></html>")

    page.route("**/api/**", bad_gateway)
    page.wait_for_selector("#net-error", state="visible", timeout=10_000)
    said = page.text_content("#net-error") or ""
    assert "HTTP 502" in said and said.endswith("Retrying…"), said
    page.unroute("**/api/**", bad_gateway)
    page.wait_for_selector("#net-error", state="hidden", timeout=20_000)


def test_a_conversation_is_forgotten_from_the_page(page: Any, server: Server) -> None:
    page.goto(server.url)
    page.fill("#chat-input", "My name is Alice.")
    page.press("#chat-input", "Enter")
    page.wait_for_selector("#chat-log li.msg.assistant[data-state='completed']", timeout=30_000)
    session = page.evaluate("localStorage.getItem('offload-session')")
    job_id = page.get_attribute("#chat-log li.msg.assistant", "data-job-id")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#chat-forget")
    page.wait_for_function("document.querySelector('#chat-forget-note').textContent"
                           ".startsWith('Forgotten')", timeout=20_000)
    assert page.locator("#chat-log li").count() == 0
    assert httpx.get(f"{server.url}/api/sessions/{session}").json()["turns"] == []
    assert httpx.get(f"{server.url}/api/jobs/{job_id}").status_code == 404
    assert page.evaluate("localStorage.getItem('offload-session')") != session
    page.reload()
    page.wait_for_function("!document.querySelector('#chat-send').disabled")
    assert page.locator("#chat-log li").count() == 0


def test_a_forget_that_failed_is_said_until_a_turn_is_taken(page: Any, server: Server) -> None:
    # "Could not forget it" stayed under the chat after the conversation went on.
    page.route("**/api/sessions/**", lambda route: route.fulfill(
        status=503, content_type="application/json", body='{"detail": "try again later"}')
        if route.request.method == "DELETE" else route.continue_())
    page.goto(server.url)
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#chat-forget")
    page.wait_for_function("document.querySelector('#chat-forget-note').textContent"
                           ".startsWith('Could not forget it')", timeout=20_000)
    page.fill("#chat-input", "How is the CPU?")
    page.press("#chat-input", "Enter")
    completed_shown(page, 1)
    assert page.text_content("#chat-forget-note") == ""


def test_a_forget_the_server_never_answers_is_given_up(page: Any, server: Server) -> None:
    # "Forgetting…" stayed, Send and Forget disabled, until a reload.
    held: list[Any] = []
    page.route("**/api/sessions/**", lambda route: held.append(route)
               if route.request.method == "DELETE" else route.continue_())
    page.clock.install()
    page.goto(server.url)
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#chat-forget")
    routed(page, held, "the forget sent")
    page.clock.fast_forward("00:31")
    page.wait_for_function("document.querySelector('#chat-forget-note').textContent"
                           ".startsWith('Forget not confirmed')", timeout=20_000)
    assert page.text_content("#chat-forget-note") == (
        "Forget not confirmed: no answer from the server in 30 s. Press Forget again to be "
        "sure.")
    assert page.is_enabled("#chat-forget") and page.is_enabled("#chat-send")


def forget_left_unconfirmed(page: Any, server: Server, first: str, held: list[Any]) -> None:
    """The page on the conversation 'forgotten-late' (its turn `first`), its Forget held
    (the route puts it in `held`) until the page gives up on it."""
    page.add_init_script("localStorage.setItem('offload-session', 'forgotten-late')")
    page.clock.install()
    page.goto(server.url)
    page.wait_for_selector(f"#chat-log li[data-job-id='{first}'][data-state='completed']",
                           timeout=30_000)
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#chat-forget")
    routed(page, held, "the forget sent")
    page.clock.fast_forward("00:31")
    page.wait_for_function("document.querySelector('#chat-forget-note').textContent"
                           ".startsWith('Forget not confirmed')", timeout=20_000)


def forgotten_after_all(page: Any, server: Server, llm: FakeLLM) -> None:
    """The question refused, the page starts a new conversation with the question kept in
    the box, and sent again it carries only itself."""
    page.wait_for_function("document.querySelector('#chat-forget-note').textContent"
                           ".startsWith('Forgotten after all')", timeout=20_000)
    assert page.locator("#chat-log li").count() == 0
    assert page.input_value("#chat-input") == "What is my secret?"
    assert httpx.get(f"{server.url}/api/sessions/forgotten-late").json()["turns"] == []
    assert page.evaluate("localStorage.getItem('offload-session')") != "forgotten-late"
    page.press("#chat-input", "Enter")
    completed_shown(page, 1)
    asked = [m["content"] for m in llm.requests[-1]["body"]["messages"] if m["role"] != "system"]
    assert asked == ["What is my secret?"], asked


@pytest.mark.parametrize("done_late", [True, False])
def test_a_forget_the_server_did_after_the_page_gave_up_is_not_undone_by_a_question(
        page: Any, server: Server, llm: FakeLLM, done_late: bool) -> None:
    # Given up after 30 s, the forget said "Could not forget it: no answer" and the page
    # kept the conversation: the server erased it late, and the next question stored the
    # forgotten turns again, in its input. Not done, the conversation goes on.
    with server.client() as client:
        first = stored_turn(client, "forgotten-late", "My secret is quokka-swordfish.")["id"]
    held: list[Any] = []
    page.route("**/api/sessions/**", lambda route: held.append(route)
               if route.request.method == "DELETE" else route.continue_())
    forget_left_unconfirmed(page, server, first, held)
    page.fill("#chat-input", "What is my secret?")
    if not done_late:
        page.press("#chat-input", "Enter")
        completed_shown(page, 2)
        asked = [m["content"] for m in llm.requests[-1]["body"]["messages"]
                 if m["role"] == "user"]
        assert asked == ["My secret is quokka-swordfish.", "What is my secret?"], asked
        assert page.text_content("#chat-forget-note") == ""
        return
    erased = httpx.delete(f"{server.url}/api/sessions/forgotten-late")  # done late
    assert erased.json()["erased"] == 1, erased.text
    page.press("#chat-input", "Enter")
    forgotten_after_all(page, server, llm)


@pytest.mark.parametrize("met", ["after the erase", "during the erase"])
def test_a_forget_done_late_while_the_next_question_was_on_its_way_is_not_undone_by_it(
        page: Any, server: Server, llm: FakeLLM, met: str) -> None:
    # The page checked that the conversation was still there, then sent the question; the
    # stalled server erased it meanwhile, and then stored the question, the forgotten turns
    # in its messages. Or the question met the erase in progress (a 409) and was sent
    # again, unchecked. The question names the turn it follows: gone, it is refused.
    with server.client() as client:
        first = stored_turn(client, "forgotten-late", "My secret is quokka-swordfish.")["id"]
    held_forget: list[Any] = []
    held_question: list[Any] = []
    page.route("**/api/sessions/**", lambda route: held_forget.append(route)
               if route.request.method == "DELETE" else route.continue_())
    route_questions(page, lambda route: held_question.append(route))
    forget_left_unconfirmed(page, server, first, held_forget)
    page.fill("#chat-input", "What is my secret?")
    page.press("#chat-input", "Enter")
    routed(page, held_question, "the question sent")
    erased = httpx.delete(f"{server.url}/api/sessions/forgotten-late")  # done late
    assert erased.json()["erased"] == 1, erased.text
    if met == "after the erase":
        held_question[0].continue_()
        page.unroute("**/api/ai_chat_async")
    else:  # scripted: the moment an erase is in progress is not had on demand
        held_question[0].fulfill(status=409, content_type="application/json", body=json.dumps(
            {"detail": "this conversation is being forgotten: start a new one (another "
                       "session_id)"}))
        page.wait_for_function("document.querySelector('#chat-log li.msg.assistant:last-child')"
                               "?.dataset.state === 'failed'", timeout=20_000)
        page.unroute("**/api/ai_chat_async")
        page.press("#chat-input", "Enter")  # sent again, as it was given back
    forgotten_after_all(page, server, llm)
    assert len(llm.requests) == 2  # the forgotten turn's, and this one


def test_a_conversation_forgotten_while_its_reply_stops_is_all_gone(
        page: Any, make_server: Callable[..., Server]) -> None:
    # Answered 409 (a reply still stopping, the other turns erased), the page said "Could
    # not forget it" and kept the conversation: its next question stored the erased turns
    # again. It asks again until every turn is gone.
    with FakeLLM(pieces=["ok"], delay_s=0) as fake:
        server = make_server(env={"OPENAI_BASE_URL": fake.base_url,
                                  "OFFLOAD_STOP_GRACE_S": "0.5"})
        with server.client() as client:
            earlier = stored_turn(client, "stopping", "My secret is quokka-swordfish.")["id"]
        fake.pieces, fake.delay_s = ["word "] * 600, 0.1
        page.add_init_script("localStorage.setItem('offload-session', 'stopping')")
        page.goto(server.url)
        page.wait_for_selector(f"#chat-log li[data-job-id='{earlier}'][data-state='completed']",
                               timeout=30_000)
        page.wait_for_function("!document.querySelector('#chat-send').disabled")
        page.fill("#chat-input", "Tell me everything.")
        page.press("#chat-input", "Enter")
        page.wait_for_function("document.querySelector('#chat-log li.msg.assistant:last-child')"
                               "?.textContent.includes('word')", timeout=20_000)
        live = page.get_attribute("#chat-log li.msg.assistant:last-child", "data-job-id")
        supervisor = server.supervisor()
        supervisor.suspend()  # nothing stops the reply meanwhile
        try:
            page.once("dialog", lambda dialog: dialog.accept())
            with page.expect_response(lambda res: res.request.method == "DELETE"
                                      and res.status == 409, timeout=60_000):
                page.click("#chat-forget")
        finally:
            supervisor.resume()
        page.wait_for_function("document.querySelector('#chat-forget-note').textContent"
                               ".startsWith('Forgotten')", timeout=30_000)
        assert page.locator("#chat-log li").count() == 0
        with server.client() as client:
            assert client.get("/api/sessions/stopping").json()["turns"] == []
            for job_id in (earlier, live):
                assert client.get(f"/api/jobs/{job_id}").status_code == 404


def test_a_conversation_forgotten_in_one_tab_is_gone_from_the_other(
        page: Any, server: Server, llm: FakeLLM, data_dir: Path) -> None:
    # The other tab still showed it, and its next question sent the forgotten turns back
    # to the server, which stored them again in the new job's input.
    page.goto(server.url)
    page.fill("#chat-input", "My secret is quokka-swordfish.")
    page.press("#chat-input", "Enter")
    page.wait_for_selector("#chat-log li.msg.assistant[data-state='completed']", timeout=30_000)
    other = page.context.new_page()
    other.goto(server.url)
    other.wait_for_selector("#chat-log li.msg.assistant[data-state='completed']",
                            timeout=30_000)
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#chat-forget")
    page.wait_for_function("document.querySelector('#chat-forget-note').textContent"
                           ".startsWith('Forgotten')", timeout=20_000)
    other.wait_for_function("document.querySelectorAll('#chat-log li').length === 0",
                            timeout=10_000)
    assert other.text_content("#chat-forget-note") == (
        "Forgotten in another tab: a new conversation starts here.")
    other.fill("#chat-input", "What is my secret?")
    other.press("#chat-input", "Enter")
    other.wait_for_selector("#chat-log li.msg.assistant[data-state='completed']",
                            timeout=30_000)
    # Said on after the new conversation had turns, in both tabs, until a reload.
    assert other.text_content("#chat-forget-note") == ""
    page.wait_for_selector("#chat-log li.msg.assistant[data-state='completed']",
                           timeout=20_000)
    assert page.text_content("#chat-forget-note") == ""
    asked = [m["content"] for m in llm.requests[-1]["body"]["messages"] if m["role"] != "system"]
    assert asked == ["What is my secret?"]
    assert not [path for path in data_dir.rglob("*")
                if b"quokka" in _bytes_of(path)], "nothing of it is stored again"
    session = page.evaluate("localStorage.getItem('offload-session')")
    assert other.evaluate("localStorage.getItem('offload-session')") == session
    turns = httpx.get(f"{server.url}/api/sessions/{session}").json()["turns"]
    assert [turn["question"] for turn in turns] == ["What is my secret?"]


def test_a_conversation_forgotten_in_another_tab_as_this_one_loads_it_stays_gone(
        page: Any, server: Server, llm: FakeLLM) -> None:
    # Its earlier turns still on their way when another tab forgot the conversation:
    # they were shown once they came, and the next question sent them back to the server.
    with server.client() as client:
        first = stored_turn(client, "forgotten-as-it-loads",
                            "My secret is quokka-swordfish.")["id"]
    held: list[Any] = []
    page.route("**/api/sessions/**",
               lambda route: held.append(route) if route.request.method == "GET"
               else route.continue_())
    page.add_init_script("localStorage.setItem('offload-session', 'forgotten-as-it-loads')")
    page.goto(server.url)
    wait_for(lambda: held, 20, 0.05, "the page to ask for its earlier turns")
    answer = held[0].fetch()  # the turns as they were when it asked
    other = page.context.new_page()
    other.goto(server.url)
    other.wait_for_selector(f"#chat-log li[data-job-id='{first}'][data-state='completed']",
                            timeout=30_000)
    other.once("dialog", lambda dialog: dialog.accept())
    other.click("#chat-forget")
    page.wait_for_function("document.querySelector('#chat-forget-note').textContent"
                           ".startsWith('Forgotten in another tab')", timeout=20_000)
    held[0].fulfill(response=answer)
    page.wait_for_function("!document.querySelector('#chat-send').disabled", timeout=20_000)
    assert page.locator("#chat-log li").count() == 0, page.inner_text("#chat-log")
    page.fill("#chat-input", "What is my secret?")
    page.press("#chat-input", "Enter")
    page.wait_for_selector("#chat-log li.msg.assistant[data-state='completed']",
                           timeout=30_000)
    asked = [m["content"] for m in llm.requests[-1]["body"]["messages"] if m["role"] != "system"]
    assert asked == ["What is my secret?"], asked


COMPLETED = "#chat-log li.msg.assistant[data-state='completed']"


def completed_shown(page: Any, count: int) -> None:
    from playwright.sync_api import TimeoutError as PageTimeout

    try:
        page.wait_for_function(f"document.querySelectorAll(\"{COMPLETED}\").length === {count}",
                               timeout=30_000)
    except PageTimeout:
        raise AssertionError(f"{count} completed replies not shown in 30 s: "
                             f"{replies_and_clock(page)}") from None


def replies_and_clock(page: Any) -> str:
    """The replies a page shows, and whether its clock and script still run (a clue to a
    reply not shown: the page stuck, or the server)."""
    from playwright.sync_api import TimeoutError as PageTimeout

    look = ("() => [Date.now(), [...document.querySelectorAll('#chat-log li.msg.assistant')]"
            ".map((li) => `${li.dataset.state}: ${li.innerText.slice(0, 80)}`)]")
    try:  # bounded: a page whose script is stuck never answers an evaluate
        before = page.wait_for_function(look, timeout=5000).json_value()
        page.wait_for_timeout(1000)
        after = page.wait_for_function(look, timeout=5000).json_value()
    except PageTimeout:
        return "the page's script does not run (5 s without an answer)"
    return f"replies {after[1]}; the page's clock moved {after[0] - before[0]} ms in 1 s"


def questions_shown(page: Any) -> list[str]:
    return [text.strip() for text in page.locator("#chat-log li.msg.user").all_inner_texts()]


def ask_in(page: Any, question: str, replies: int) -> None:
    """Ask `question` on `page`, and wait until it shows `replies` completed replies."""
    page.fill("#chat-input", question)
    page.press("#chat-input", "Enter")
    completed_shown(page, replies)


def users_asked(llm: FakeLLM) -> list[str]:
    """The questions of the conversation the model was last asked."""
    return [m["content"] for m in llm.requests[-1]["body"]["messages"] if m["role"] == "user"]


def test_a_turn_asked_in_one_tab_is_shown_and_carried_by_the_other(
        page: Any, server: Server, llm: FakeLLM) -> None:
    # The other tab went on with the conversation as it had loaded it: its next question
    # went without this tab's newer turns, which it showed only after a reload.
    page.goto(server.url)
    ask_in(page, "My name is Alice.", 1)
    other = page.context.new_page()
    other.goto(server.url)
    completed_shown(other, 1)
    ask_in(page, "I live in Lyon.", 2)
    completed_shown(other, 2)
    assert questions_shown(other) == ["My name is Alice.", "I live in Lyon."]
    ask_in(other, "Where do I live?", 3)
    asked = users_asked(llm)
    assert asked == ["My name is Alice.", "I live in Lyon.", "Where do I live?"], asked
    completed_shown(page, 3)
    assert questions_shown(page) == asked


def test_a_page_brought_back_by_back_shows_the_turns_taken_since(
        page: Any, server: Server, llm: FakeLLM) -> None:
    # Its conversation came from the browser's cache as the page first loaded it: a turn
    # vanished, and the next question went without it.
    page.goto(server.url)
    ask_in(page, "My name is Alice.", 1)
    page.reload()  # the page asks the server for the conversation's turns
    completed_shown(page, 1)
    ask_in(page, "I live in Lyon.", 2)
    page.goto(f"{server.url}/docs")
    page.go_back()
    completed_shown(page, 2)
    assert questions_shown(page) == ["My name is Alice.", "I live in Lyon."]
    ask_in(page, "Where do I live?", 3)
    asked = users_asked(llm)
    assert asked == ["My name is Alice.", "I live in Lyon.", "Where do I live?"], asked


def test_a_tab_whose_storage_was_cleared_leaves_the_others_conversation_alone(
        page: Any, server: Server, llm: FakeLLM) -> None:
    # Its new session id was taken for a forget: the other tabs said "Forgotten in another
    # tab" and dropped the conversation, which the server still held.
    page.goto(server.url)
    page.fill("#chat-input", "My name is Alice.")
    page.press("#chat-input", "Enter")
    completed_shown(page, 1)
    session = page.evaluate("localStorage.getItem('offload-session')")
    other = page.context.new_page()
    other.goto(server.url)
    completed_shown(other, 1)
    other.evaluate("localStorage.clear()")
    other.reload()
    other.wait_for_function("localStorage.getItem('offload-session')"
                            f" && localStorage.getItem('offload-session') !== '{session}'")
    assert other.locator("#chat-log li").count() == 0
    page.wait_for_timeout(1000)  # the other tab's news, had there been any, has come
    assert page.text_content("#chat-forget-note") == ""
    page.fill("#chat-input", "What is my name?")
    page.press("#chat-input", "Enter")
    completed_shown(page, 2)
    asked = [m["content"] for m in llm.requests[-1]["body"]["messages"] if m["role"] == "user"]
    assert asked == ["My name is Alice.", "What is my name?"], asked
    turns = httpx.get(f"{server.url}/api/sessions/{session}").json()["turns"]
    assert [turn["question"] for turn in turns] == asked


def _bytes_of(path: Path) -> bytes:
    try:
        return path.read_bytes() if path.is_file() else b""  # not a folder or a socket
    except FileNotFoundError:  # replaced meanwhile
        return b""


def test_a_long_conversation_goes_on_with_its_latest_turns(
        page: Any, make_server: Callable[..., Server]) -> None:
    # The page sent every earlier turn with each question, and the API takes 200 messages
    # of 100,000 characters, in 1 MB: a conversation's 101st question was refused, and so
    # was every one after it (and every one after a reply of 100,001 characters).
    with FakeLLM(pieces=["ok"], delay_s=0) as fake:
        server = make_server(env={"OPENAI_BASE_URL": fake.base_url})
        with server.client() as client:
            for i in range(101):
                # The last ten replies long: together more than a body may hold.
                fake.pieces = ["y" * 99_000 if i > 90 else "ok"]
                stored_turn(client, "a-long-one", f"question {i}")
        page.goto(server.url)
        page.evaluate("localStorage.setItem('offload-session', 'a-long-one')")
        page.reload()

        def ask(text: str, replies: int) -> list[dict[str, Any]]:
            page.wait_for_function("!document.querySelector('#chat-send').disabled",
                                   timeout=30_000)
            page.fill("#chat-input", text)
            page.press("#chat-input", "Enter")
            page.wait_for_function("document.querySelectorAll('#chat-log li.msg.assistant"
                                   f"[data-state]').length === {replies}", timeout=30_000)
            last = page.locator("#chat-log li.msg.assistant").last
            assert last.get_attribute("data-state") == "completed", last.inner_text()[:300]
            messages: list[dict[str, Any]] = fake.requests[-1]["body"]["messages"]
            assert messages[-1]["content"] == text
            return messages

        page.wait_for_function("document.querySelectorAll('#chat-log li.msg.assistant"
                               "[data-state=completed]').length === 101", timeout=30_000)
        fake.pieces = ["z" * 100_001]
        sent = ask("question 101", 102)
        said = [m["content"] for m in sent if m["role"] == "user"]
        assert said[-3:] == ["question 99", "question 100", "question 101"], said[-3:]
        assert len(sent) <= 201  # 200 and the expert's system prompt
        fake.pieces = ["ok"]
        sent = ask("question 102", 103)
        # The reply of 100,001 characters could not be sent: nothing before it is either.
        assert [m["content"] for m in sent if m["role"] != "system"] == ["question 102"]
        sent = ask("question 103", 104)
        assert [m["content"] for m in sent if m["role"] != "system"] == [
            "question 102", "ok", "question 103"]


def test_a_turn_of_astral_characters_within_the_bounds_is_sent(
        page: Any, make_server: Callable[..., Server]) -> None:
    # The API counts a message's characters (code points); the page counted UTF-16 units,
    # two for each emoji: a question of 50,001 emoji, taken by the API, read as over
    # 100,000 characters, and it and every turn before it were left out from then on.
    with FakeLLM(pieces=["ok"], delay_s=0) as fake:
        server = make_server(env={"OPENAI_BASE_URL": fake.base_url})
        with server.client() as client:
            for question in ("My name is Alice.", "\U0001F600" * 50_001):
                assert stored_turn(client, "astral", question)["state"] == "completed"
        page.add_init_script("localStorage.setItem('offload-session', 'astral')")
        page.goto(server.url)
        page.wait_for_function("document.querySelectorAll('#chat-log li.msg.assistant"
                               "[data-state=completed]').length === 2", timeout=30_000)
        page.wait_for_function("!document.querySelector('#chat-send').disabled",
                               timeout=30_000)
        page.fill("#chat-input", "What is my name?")
        page.press("#chat-input", "Enter")
        page.wait_for_function("document.querySelectorAll('#chat-log li.msg.assistant"
                               "[data-state=completed]').length === 3", timeout=30_000)
        said = [m["content"] for m in fake.requests[-1]["body"]["messages"]
                if m["role"] == "user"]
        assert said[0] == "My name is Alice." and len(said) == 3, [s[:20] for s in said]


def test_cancel_stops_a_chat(page: Any, make_server: Callable[..., Server]) -> None:
    with FakeLLM(pieces=["word "] * 200, delay_s=0.1) as slow:
        server = make_server(env={"OPENAI_BASE_URL": slow.base_url})
        page.goto(server.url)
        page.fill("#chat-input", "Tell me everything.")
        page.press("#chat-input", "Enter")
        reply = page.locator("#chat-log li.msg.assistant").last
        page.wait_for_function("document.querySelector('#chat-log li.msg.assistant:last-child')"
                               "?.textContent.includes('word')", timeout=20_000)
        page.click("#chat-cancel")
        page.wait_for_function("document.querySelector('#chat-log li.msg.assistant:last-child')"
                               "?.dataset.state === 'cancelled'", timeout=20_000)
        job_id = reply.get_attribute("data-job-id")
        job = httpx.get(f"{server.url}/api/jobs/{job_id}").json()
    assert job["state"] == "cancelled"


def test_a_reply_cut_midway_keeps_its_words_under_its_error(
        page: Any, make_server: Callable[..., Server]) -> None:
    # The error says "the partial reply is kept"; the bubble put the error in its place,
    # and so did the page reloaded.
    with FakeLLM(pieces=["some ", "words ", "then ", "more"], cut_after=2, delay_s=0) as cut:
        server = make_server(env={"OPENAI_BASE_URL": cut.base_url,
                                  "OFFLOAD_RETRY_BASE_S": "0.1"})
        page.goto(server.url)
        page.fill("#chat-input", "Tell me everything.")
        page.press("#chat-input", "Enter")
        for shown in ("as it ends", "once the page is loaded again"):
            if shown != "as it ends":
                page.reload()
            page.wait_for_selector("#chat-log li.msg.assistant[data-state='failed']",
                                   timeout=60_000)
            reply = "#chat-log li.msg.assistant"
            assert page.text_content(f"{reply} .text") == "some words ", shown
            note = page.text_content(f"{reply} .note") or ""
            assert note.startswith("Error: ") and "partial reply is kept" in note, (shown, note)


def test_a_reply_tried_again_says_why_its_words_started_over(
        page: Any, make_server: Callable[..., Server]) -> None:
    # A reply whose stream was cut (the model server killed or restarted, an API restart
    # stopping the embedded model) is tried again: its words went away and came again
    # from the start, under "thinking…", with nothing said.
    with FakeLLM(pieces=["word "] * 30, cut_after=3, cut_times=1, delay_s=0.1) as cut:
        server = make_server(env={"OPENAI_BASE_URL": cut.base_url,
                                  "OFFLOAD_RETRY_BASE_S": "0.1"})
        page.goto(server.url)
        page.fill("#chat-input", "Tell me everything.")
        page.press("#chat-input", "Enter")
        reply = "#chat-log li.msg.assistant"
        page.wait_for_function(
            f"(document.querySelector('{reply} .note') || {{}}).textContent"
            "?.startsWith('Answering again (attempt 2 of 2): ')", timeout=60_000)
        note = page.text_content(f"{reply} .note") or ""
        assert "stream ended before the reply was complete" in note, note
        page.wait_for_selector(f"{reply}[data-state='completed']", timeout=60_000)
        assert page.text_content(f"{reply} .text") == "word " * 30
        assert page.text_content(f"{reply} .note") == ""


def test_a_reply_cancelled_while_its_question_is_sent_is_cancelled(
        page: Any, make_server: Callable[..., Server]) -> None:
    # "Cancel reply" showed while a slow server took the question, and did nothing when
    # pressed: the reply came all the same.
    with FakeLLM(pieces=["word "] * 200, delay_s=0.1) as slow:
        server = make_server(env={"OPENAI_BASE_URL": slow.base_url})
        held: list[Any] = []
        route_questions(page, lambda route: held.append(route))
        page.goto(server.url)
        page.fill("#chat-input", "Tell me everything.")
        page.press("#chat-input", "Enter")
        deadline = time.monotonic() + 20
        while not held and time.monotonic() < deadline:
            page.wait_for_timeout(100)
        assert held, "the question was sent"
        assert page.is_enabled("#chat-cancel")
        page.click("#chat-cancel")
        held[0].continue_()
        page.wait_for_selector("#chat-log li.msg.assistant[data-state='cancelled']",
                               timeout=20_000)
        job_id = page.get_attribute("#chat-log li.msg.assistant", "data-job-id")
        job = httpx.get(f"{server.url}/api/jobs/{job_id}").json()
    assert job["state"] == "cancelled"


def test_a_reply_cancelled_while_its_question_is_sent_then_cut_is_cancelled(
        page: Any, make_server: Callable[..., Server]) -> None:
    # Cancel pressed while the question was on its way, whose answer was then cut: the
    # turn the server had was found again, and answered on to its end.
    with FakeLLM(pieces=["word "] * 200, delay_s=0.1) as slow:
        server = make_server(env={"OPENAI_BASE_URL": slow.base_url})
        held: list[Any] = []
        route_questions(page, lambda route: held.append(route))
        page.goto(server.url)
        page.fill("#chat-input", "Tell me everything.")
        page.press("#chat-input", "Enter")
        routed(page, held, "the question sent")
        page.click("#chat-cancel")
        held[0].fetch()  # the server takes it
        held[0].abort("connectionreset")
        page.wait_for_selector("#chat-log li.msg.assistant[data-state='cancelled']",
                               timeout=20_000)
        job_id = page.get_attribute("#chat-log li.msg.assistant", "data-job-id")
        job = httpx.get(f"{server.url}/api/jobs/{job_id}").json()
    assert job["state"] == "cancelled"
    assert page.locator("#chat-log li.msg.assistant").count() == 1


def test_a_question_and_reply_in_a_right_to_left_language_read_right_to_left(
        page: Any, make_server: Callable[..., Server]) -> None:
    # Laid out left to right, an Arabic reply ended in its question mark on the wrong side.
    with FakeLLM(pieces=["مرحبا", "، ", "كيف ", "حالك", "؟"], delay_s=0.05) as fake:
        server = make_server(env={"OPENAI_BASE_URL": fake.base_url})
        page.goto(server.url)
        page.fill("#chat-input", "كيف حال المعالج؟")
        assert page.evaluate("document.querySelector('#chat-input').matches(':dir(rtl)')")
        page.press("#chat-input", "Enter")
        completed_shown(page, 1)
    directions = page.eval_on_selector_all(
        "#chat-log .msg .text", "els => els.map(el => el.matches(':dir(rtl)'))")
    assert directions == [True, True]
    page.fill("#chat-input", "How is the CPU?")
    assert page.evaluate("document.querySelector('#chat-input').matches(':dir(ltr)')")


def test_a_question_of_indented_code_keeps_its_indent(page: Any, server: Server,
                                                     llm: FakeLLM) -> None:
    # Trimmed whole, pasted Python lost its first line's indent: the model saw other code.
    code = "    def f():\n        return 1\n    print(f())"
    page.goto(server.url)
    page.fill("#chat-input", f"\n{code}\n\n")
    page.press("#chat-input", "Enter")
    completed_shown(page, 1)
    assert page.text_content("#chat-log li.msg.user .text") == code
    assert llm.requests[-1]["body"]["messages"][-1]["content"] == code


def test_a_cancel_the_server_never_answers_can_be_pressed_again(
        page: Any, make_server: Callable[..., Server]) -> None:
    # Its DELETE unanswered, "Cancel reply" stayed disabled while the reply went on.
    with FakeLLM(pieces=["word "] * 600, delay_s=0.1) as slow:
        server = make_server(env={"OPENAI_BASE_URL": slow.base_url})
        held: list[Any] = []
        page.route("**/api/jobs/*", lambda route: held.append(route)
                   if route.request.method == "DELETE" else route.continue_())
        page.clock.install()
        page.goto(server.url)
        page.fill("#chat-input", "Tell me everything.")
        page.press("#chat-input", "Enter")
        page.wait_for_function("document.querySelector('#chat-log li.msg.assistant:last-child')"
                               "?.textContent.includes('word')", timeout=20_000)
        page.click("#chat-cancel")
        routed(page, held, "the cancel sent")
        assert page.is_disabled("#chat-cancel")
        page.clock.fast_forward("00:31")
        page.wait_for_function("!document.querySelector('#chat-cancel').disabled",
                               timeout=20_000)
        # Given up, it said nothing: the reply went on as if the cancel was being done.
        assert page.text_content("#chat-log li.msg.assistant .note") == (
            "Cancel not confirmed: no answer from the server in 30 s. Press Cancel again to "
            "be sure.")
        page.unroute("**/api/jobs/*")
        page.click("#chat-cancel")
        page.wait_for_selector("#chat-log li.msg.assistant[data-state='cancelled']",
                               timeout=20_000)
        assert page.text_content("#chat-log li.msg.assistant .note") == "Cancelled."


def test_a_cancel_on_a_full_disk_says_it_goes_ahead(
        page: Any, make_server: Callable[..., Server], tmp_path: Path) -> None:
    # The disk full, the cancel goes ahead (its request left empty) and its 507 says so;
    # the chat and the jobs table showed it as "Could not cancel it: ... The cancel is
    # recorded".
    from tests.conftest import small_disk
    from tests.test_full_disk import disk_filled

    with FakeLLM(pieces=["word "] * 600, delay_s=0.1) as slow, \
            small_disk(tmp_path, "512k") as disk:
        server = make_server(env={"OPENAI_BASE_URL": slow.base_url,
                                  "OFFLOAD_DATA_DIR": str(disk / "var")})
        page.goto(server.url)
        page.fill("#chat-input", "Tell me everything.")
        page.press("#chat-input", "Enter")
        page.wait_for_function("document.querySelector('#chat-log li.msg.assistant:last-child')"
                               "?.textContent.includes('word')", timeout=20_000)
        napping = httpx.post(f"{server.url}/api/jobs", json={
            "kind": "sleep", "input": {"seconds": 300}}).json()["id"]
        row = f"#jobs-table tr[data-job-id='{napping}']"
        page.wait_for_selector(f"{row}[data-state='running']", timeout=20_000)
        note = "#chat-log li.msg.assistant:last-child .note"
        with disk_filled(disk):
            page.click("#chat-cancel")
            page.wait_for_function(f"document.querySelector('{note}').textContent"
                                   ".includes('The cancel is recorded')", timeout=60_000)
            said = page.text_content(note)
            assert not said.startswith("Could not cancel it"), said
            page.click(f"{row} button.cancel-job")
            page.wait_for_function("document.querySelector('#jobs-note').textContent"
                                   ".includes('The cancel is recorded')", timeout=60_000)
            said = page.text_content("#jobs-note")
            assert said.startswith(f"Job {napping[:8]}: "), said
        page.wait_for_selector("#chat-log li.msg.assistant[data-state='cancelled']",
                               timeout=60_000)
        page.wait_for_selector(f"{row}[data-state='cancelled']", timeout=60_000)


def test_a_forget_on_a_full_disk_says_what_waits_for_room(
        page: Any, make_server: Callable[..., Server], tmp_path: Path) -> None:
    # The disk full, the forget was answered 409 after the stop's grace and 10 s (the
    # reply's end had no room), and the page asked again up to 30 times: "Forgetting…",
    # Send and Forget disabled for minutes, nothing said of the disk. Its 507 is said in
    # the server's words; the turns it erased leave the page. Another tab, never told, sent
    # them again with its next question once there was room, following the turn kept: it
    # is refused, and that tab, and this one, start a new conversation, the rest of the
    # forgotten one erased.
    from tests.conftest import small_disk
    from tests.test_full_disk import disk_filled

    with FakeLLM(pieces=["ok"], delay_s=0) as fake, small_disk(tmp_path, "512k") as disk:
        server = make_server(env={"OPENAI_BASE_URL": fake.base_url,
                                  "OFFLOAD_DATA_DIR": str(disk / "var")})
        page.goto(server.url)
        page.fill("#chat-input", "My secret is quokka-swordfish.")
        page.press("#chat-input", "Enter")
        completed_shown(page, 1)
        session = page.evaluate("localStorage.getItem('offload-session')")
        fake.pieces, fake.delay_s = ["word "] * 600, 0.1
        page.fill("#chat-input", "Tell me everything.")
        page.press("#chat-input", "Enter")
        page.wait_for_function("document.querySelector('#chat-log li.msg.assistant:last-child')"
                               "?.textContent.includes('word')", timeout=20_000)
        other = page.context.new_page()
        other.goto(server.url)
        other.wait_for_function("document.querySelectorAll('#chat-log li').length === 4",
                                timeout=30_000)
        note = "#chat-forget-note"
        with disk_filled(disk):
            page.once("dialog", lambda dialog: dialog.accept())
            page.click("#chat-forget")
            page.wait_for_function(f"document.querySelector('{note}').textContent"
                                   ".includes('still answering')", timeout=20_000)
            said = page.text_content(note)
            assert said.startswith("no room on the data folder's disk for the final state of "
                                   "1 turn still answering. 1 turn erased;"), said
            assert said.endswith("free some space on it, then retry."), said
            assert page.is_enabled("#chat-forget")
            page.wait_for_function("document.querySelectorAll('#chat-log li').length === 2")
            assert questions_shown(page) == ["Tell me everything."]
        page.wait_for_selector("#chat-log li.msg.assistant[data-state='cancelled']",
                               timeout=60_000)
        other.wait_for_selector("#chat-log li.msg.assistant[data-state='cancelled']",
                                timeout=60_000)
        other.wait_for_function("!document.querySelector('#chat-send').disabled")
        fake.pieces, fake.delay_s = ["ok"], 0
        other.fill("#chat-input", "What is my secret?")
        other.press("#chat-input", "Enter")
        other.wait_for_function(f"document.querySelector('{note}').textContent"
                                ".startsWith('Forgotten after all')", timeout=20_000)
        assert other.locator("#chat-log li").count() == 0
        assert other.input_value("#chat-input") == "What is my secret?"
        page.wait_for_function("document.querySelectorAll('#chat-log li').length === 0",
                               timeout=10_000)
        with server.client() as client:  # the turn kept is erased now there is room
            wait_for(lambda: client.get(f"/api/sessions/{session}").json()["turns"] == [],
                     30, 0.1, "the turn kept erased")
        other.press("#chat-input", "Enter")
        completed_shown(other, 1)
        asked = [m["content"] for m in fake.requests[-1]["body"]["messages"]
                 if m["role"] == "user"]
        assert asked == ["What is my secret?"], asked
        assert not [path for path in (disk / "var").rglob("*")
                    if b"quokka" in _bytes_of(path)], "nothing of it is stored again"
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#chat-forget")
        page.wait_for_function(f"document.querySelector('{note}').textContent"
                               ".startsWith('Forgotten')", timeout=20_000)
        assert page.locator("#chat-log li").count() == 0


def test_a_long_reply_is_followed_to_its_end(page: Any,
                                             make_server: Callable[..., Server]) -> None:
    # The conversation's box stayed where it was as the reply grew past its bottom: the
    # reply's end was out of sight until scrolled to by hand.
    with FakeLLM(pieces=[f"Line {n} of a long reply.\n" for n in range(60)],
                 delay_s=0.05) as fake:
        server = make_server(env={"OPENAI_BASE_URL": fake.base_url})
        page.goto(server.url)
        page.fill("#chat-input", "Tell me everything.")
        page.press("#chat-input", "Enter")
        completed_shown(page, 1)
    log = page.locator("#chat-log")
    assert log.evaluate("el => el.scrollHeight > el.clientHeight"), "a reply longer than the box"
    assert log.evaluate("el => el.scrollHeight - el.scrollTop - el.clientHeight < 2")
    assert page.locator("#chat-log li.msg.assistant").evaluate(
        "li => { const box = li.parentElement.getBoundingClientRect();"
        " return li.getBoundingClientRect().bottom <= box.bottom + 1; }"), "its end in sight"


def test_keys_pressed_on_the_chats_buttons_leave_the_focus_in_the_box(
        page: Any, make_server: Callable[..., Server]) -> None:
    # Send disabled, Cancel reply hidden as they were pressed: the focus fell to the start
    # of the page, and a keyboard user tabbed back through it all to type again.
    with FakeLLM(pieces=["word "] * 200, delay_s=0.1) as slow:
        server = make_server(env={"OPENAI_BASE_URL": slow.base_url})
        page.goto(server.url)
        page.fill("#chat-input", "Tell me everything.")
        page.focus("#chat-send")
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelector('#chat-log li.msg.assistant:last-child')"
                               "?.textContent.includes('word')", timeout=20_000)
        assert page.evaluate("document.activeElement.id") == "chat-input"
        page.focus("#chat-cancel")
        page.keyboard.press("Enter")
        page.wait_for_selector("#chat-log li.msg.assistant[data-state='cancelled']",
                               timeout=20_000)
        assert page.evaluate("document.activeElement.id") == "chat-input"


def test_a_reply_that_speaks_again_after_a_silence_can_be_cancelled(
        page: Any, make_server: Callable[..., Server]) -> None:
    # Said silent after 120 s, then streaming again, it had no Cancel reply to its end.
    with FakeLLM(pieces=["word "] * 300, delay_s=0.2) as slow:
        server = make_server(env={"OPENAI_BASE_URL": slow.base_url})
        page.clock.install()
        page.goto(server.url)
        page.fill("#chat-input", "Tell me everything.")
        page.press("#chat-input", "Enter")
        page.wait_for_function("document.querySelector('#chat-log li.msg.assistant:last-child')"
                               "?.textContent.includes('word')", timeout=20_000)
        page.evaluate("""() => {
            const li = document.querySelector('#chat-log li.msg.assistant');
            window.wentSilent = false;
            new MutationObserver(() => { window.wentSilent ||= li.classList.contains('stalled'); })
                .observe(li, {attributes: true, attributeFilter: ['class']});
        }""")
        page.clock.fast_forward("03:00")  # no word for three minutes, as the page tells
        page.wait_for_function("window.wentSilent && !document.querySelector("
                               "'#chat-log li.msg.assistant').classList.contains('stalled')",
                               timeout=10_000)
        assert page.is_visible("#chat-cancel")
        page.click("#chat-cancel")
        page.wait_for_selector("#chat-log li.msg.assistant[data-state='cancelled']",
                               timeout=20_000)


def test_a_reply_cancelled_while_its_polls_failed_leaves_no_banner(
        page: Any, make_server: Callable[..., Server]) -> None:
    # Its stream refused, its polls answered 502 (a proxy while the server restarted): the
    # banner said "Retrying…", and it went on saying so once the reply was cancelled,
    # though nothing retried anything (until a next question's reply streamed).
    with FakeLLM(pieces=["word "] * 300, delay_s=0.1) as slow:
        server = make_server(env={"OPENAI_BASE_URL": slow.base_url})
        page.route("**/events", lambda route: route.fulfill(
            status=503, content_type="application/json", headers={"Retry-After": "1"},
            body='{"detail": "too many open event streams"}'))
        page.route("**/api/ai_chat_result/**", lambda route: route.fulfill(
            status=502, content_type="text/html", body="<h1>502 Bad Gateway</h1>"))
        page.goto(server.url)
        page.fill("#chat-input", "Tell me everything.")
        page.press("#chat-input", "Enter")
        page.wait_for_selector("#net-error", state="visible", timeout=20_000)
        assert "chat: HTTP 502" in (page.text_content("#net-error") or "")
        page.click("#chat-cancel")
        page.wait_for_selector("#chat-log li.msg.assistant[data-state='cancelled']",
                               timeout=20_000)
        page.wait_for_selector("#net-error", state="hidden", timeout=5_000)


def test_a_cancel_answered_before_the_reply_stopped_is_no_refusal(
        page: Any, make_server: Callable[..., Server]) -> None:
    # The cancel was taken (its stop request written), but the job was not stopped yet
    # when its answer came (a supervisor stalled, a runner slow to stop): 200, `running`.
    # The chat said "Could not cancel it: null" of the cancel that then stopped it.
    with FakeLLM(pieces=["word "] * 300, delay_s=0.1) as slow:
        server = make_server(env={"OPENAI_BASE_URL": slow.base_url,
                                  "OFFLOAD_STOP_GRACE_S": "0.5"})
        page.goto(server.url)
        page.fill("#chat-input", "Tell me everything.")
        page.press("#chat-input", "Enter")
        page.wait_for_function("document.querySelector('#chat-log li.msg.assistant:last-child')"
                               "?.textContent.includes('word')", timeout=20_000)
        supervisor = server.supervisor()
        supervisor.suspend()
        try:
            with page.expect_response(lambda res: res.request.method == "DELETE",
                                      timeout=30_000) as answered:
                page.click("#chat-cancel")
            answer = answered.value
            assert answer.status == 200 and answer.json()["state"] == "running"
            page.wait_for_timeout(300)
            note = page.text_content("#chat-log li.msg.assistant:last-child .note") or ""
            assert "Could not cancel" not in note, note
        finally:
            supervisor.resume()
        page.wait_for_selector("#chat-log li.msg.assistant[data-state='cancelled']",
                               timeout=20_000)


def test_a_cancel_the_job_outran_says_so(page: Any, make_server: Callable[..., Server]) -> None:
    # The job ended by itself while its cancel waited for it (a supervisor stalled, a runner
    # ending its work): answered 200 with `completed`, the table said "Cancelled job …".
    server = make_server()
    quick = submit(server, "sleep", seconds=3, steps=1)
    page.goto(server.url)
    row = f"#jobs-table tr[data-job-id='{quick}']"
    page.wait_for_selector(f"{row}[data-state='running']", timeout=20_000)
    supervisor = server.supervisor()
    supervisor.suspend()
    try:
        with page.expect_response(lambda res: res.request.method == "DELETE",
                                  timeout=30_000) as answered:
            page.click(f"{row} button.cancel-job")
        assert answered.value.status == 200
        assert answered.value.json()["state"] == "completed"
        page.wait_for_selector(f"{row}[data-state='completed']", timeout=20_000)
        said = page.text_content("#jobs-note") or ""
        assert f"Cancelled job {quick[:8]}" not in said, said
        assert f"Job {quick[:8]} had already ended (completed)." in said, said
    finally:
        supervisor.resume()


def test_a_refused_cancel_says_why(page: Any, make_server: Callable[..., Server]) -> None:
    # A 503 (a data folder that cannot be written) went unsaid, in the chat as in the
    # table: the job answered on, its Cancel button as if never pressed.
    with FakeLLM(pieces=["word "] * 300, delay_s=0.1) as slow:
        server = make_server(env={"OPENAI_BASE_URL": slow.base_url})
        napping = submit(server, "sleep", seconds=60)
        page.goto(server.url)
        page.fill("#chat-input", "Tell me everything.")
        page.press("#chat-input", "Enter")
        page.wait_for_function("document.querySelector('#chat-log li.msg.assistant:last-child')"
                               "?.textContent.includes('word')", timeout=20_000)
        chat = page.get_attribute("#chat-log li.msg.assistant:last-child", "data-job-id")
        row = f"#jobs-table tr[data-job-id='{napping}']"
        page.wait_for_selector(f"{row}[data-state='running']", timeout=20_000)
        folders = [str(server.data_dir / "jobs" / job_id) for job_id in (chat, napping)]
        subprocess.run(["chattr", "+i", *folders], check=True)  # as a full disk refuses
        try:
            page.click("#chat-cancel")
            page.wait_for_function("document.querySelector('#chat-log li.msg.assistant"
                                   ":last-child .note').textContent.startsWith("
                                   "'Could not cancel it: ')", timeout=20_000)
            page.click(f"{row} button.cancel-job")
            page.wait_for_function("document.querySelector('#jobs-note').textContent"
                                   f".startsWith('Could not cancel job {napping[:8]}: ')",
                                   timeout=20_000)
            assert page.get_attribute(row, "data-state") == "running"
            assert page.get_attribute("#chat-log li.msg.assistant:last-child",
                                      "data-state") is None
        finally:
            subprocess.run(["chattr", "-i", *folders], check=True)
        page.click("#chat-cancel")
        page.wait_for_selector("#chat-log li.msg.assistant[data-state='cancelled']",
                               timeout=20_000)
        page.click(f"{row} button.cancel-job")
        page.wait_for_selector(f"{row}[data-state='cancelled']", timeout=20_000)
        assert f"Cancelled job {napping[:8]}." in (page.text_content("#jobs-note") or "")


def test_training_shows_progress_then_a_forecast(page: Any, data_dir: Path,
                                                 make_server: Callable[..., Server]) -> None:
    record_history(data_dir, seconds=10_800)  # three hours: a few seconds of training
    server = make_server(env={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    page.goto(server.url)
    page.click("#train-start")
    fractions = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        value = page.eval_on_selector("#train-progress", "el => el.value")
        fractions.add(round(float(value or 0), 2))
        if page.get_attribute("#history-chart", "data-forecast"):
            break
        time.sleep(0.05)
    assert page.get_attribute("#history-chart", "data-forecast") == "1"
    assert any(0 < f < 1 for f in fractions), f"progress should show on the way: {fractions}"
    assert "completed" in page.inner_text("#train-status").lower()


def test_the_forecast_is_asked_for_only_once_a_model_exists(
        page: Any, data_dir: Path, make_server: Callable[..., Server]) -> None:
    # With 50 jobs or more listed, the page asked for a forecast on load whether or not a
    # model existed (a 409); with fewer, it never drew the forecast of a model whose
    # training job was removed, or trained from the CLI after the page loaded.
    record_history(data_dir, seconds=10_800)
    server = make_server(env={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    asked: list[int] = []
    page.on("response", lambda answer: asked.append(answer.status)
            if "/api/predict" in answer.url else None)
    with server.client() as client:
        client.post("/api/jobs/batch", json={"jobs": [
            {"kind": "sleep", "input": {"seconds": 0}}] * 55}).raise_for_status()
        page.goto(server.url)
        page.wait_for_function("document.querySelector('#status [data-field=forecast]')"
                               ".textContent.startsWith('none yet')", timeout=20_000)
        page.wait_for_timeout(1000)
        assert asked == [], asked
        trained = client.post("/api/jobs", json={"kind": "train", "input": {}}).json()["id"]
        wait_for(lambda: client.get(f"/api/jobs/{trained}").json()["state"] == "completed",
                 120, 0.2, "the model to be trained")
        client.post(f"/api/jobs/{trained}/remove").raise_for_status()
        # Trained elsewhere: drawn at the next look at the server's health.
        page.wait_for_function("document.querySelector('#history-chart').dataset.forecast"
                               " === '1'", timeout=20_000)
        assert page.text_content("#status [data-field=forecast]") == "version 1"
        page.reload()  # its job gone, the model still draws
        page.wait_for_function("document.querySelector('#history-chart').dataset.forecast"
                               " === '1'", timeout=20_000)
    assert asked and set(asked) == {200}, asked


def test_seed_frontend_snippet_gets_its_reply(page: Any, server: Server) -> None:
    """The seed's frontend code, run as it is in the page (its `this` given an
    _appendMessage that records what it shows)."""
    page.goto(server.url)
    result = page.evaluate("""async () => {
        const shown = [];
        const self = {_appendMessage: (role, text) => shown.push([role, text])};
        const messages = [{role: 'user', content: 'How is the CPU?'}];
        const session_id = 'seed-test';
        await (async function () {
            // 1. 發送請求，立即獲得 job_id
            const {job_id} = await fetch('/api/ai_chat_async', {
                method: 'POST',
                headers: {'Content-Type': 'application/json'},
                body: JSON.stringify({messages, session_id})
            }).then(r => r.json());
            // 2. 輪詢結果
            await new Promise(resolve => {
                const pollInterval = setInterval(async () => {
                    const result = await fetch(`/api/ai_chat_result/${job_id}`).then(r => r.json());
                    if (result.status === 'completed') {
                        clearInterval(pollInterval);
                        this._appendMessage('assistant', result.reply);
                        resolve();
                    } else if (result.status === 'error') {
                        clearInterval(pollInterval);
                        this._appendMessage('assistant', '❌ ' + result.message);
                        resolve();
                    }
                }, 1000);
                setTimeout(() => { clearInterval(pollInterval); resolve(); }, 30000);
            });
        }).call(self);
        return shown;
    }""")
    assert result == [["assistant", "The CPU is busy but fine right now."]]


def test_phone_width_and_dark_mode(browser: Any, server: Server) -> None:
    context = browser.new_context(viewport={"width": 375, "height": 800},
                                  color_scheme="dark")
    page = context.new_page()
    page.goto(server.url)
    page.wait_for_function("Number(document.querySelector('#history-chart')"
                           ".dataset.updates || 0) >= 1", timeout=15_000)
    width = page.evaluate("document.documentElement.scrollWidth")
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "phone_dark.png"), full_page=True)
    labels = page.evaluate("""[...document.querySelectorAll('input, textarea, select')]
        .filter(el => el.type !== 'hidden')
        .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label'))
        .map(el => el.id || el.name)""")
    context.close()
    assert width <= 375, "no sideways scrolling on a phone"
    rgb = [int(x) for x in background[background.index("(") + 1:-1].split(",")[:3]]
    assert sum(rgb) < 3 * 100, f"dark mode should darken the page: {background}"
    assert labels == [], f"inputs without labels: {labels}"


def test_jobs_table_shows_a_failed_job_and_its_log(page: Any, server: Server) -> None:
    job = httpx.post(f"{server.url}/api/jobs",
                     json={"kind": "probe", "input": {"fail": "disk on fire"}}).json()
    page.goto(server.url)
    row = f"#jobs-table tr[data-job-id='{job['id']}']"
    page.wait_for_selector(f"{row}[data-state='failed']", timeout=20_000)
    where = page.text_content(f"{row} td[data-col=where]") or ""
    assert where.startswith("local · "), f"the row says where the job ran: {where!r}"
    # At 1200 px the table scrolled sideways, the Remove button out of sight; at 800 px
    # it scrolls, and its actions stay in sight at its right edge.
    for width in (1200, 800):
        page.set_viewport_size({"width": width, "height": 900})
        assert page.evaluate("""row => {
            const wrap = document.querySelector('#jobs-table').parentElement
                .getBoundingClientRect();
            const button = document.querySelector(`${row} button.remove-job`)
                .getBoundingClientRect();
            return button.left >= wrap.left && button.right <= wrap.right;
        }""", row), f"every action in sight without scrolling at {width} px"
    page.set_viewport_size({"width": 1200, "height": 900})
    page.click(f"{row} button.show-log")
    page.wait_for_function("document.querySelector('#log-viewer').textContent"
                           ".includes('disk on fire')", timeout=10_000)
    assert page.is_visible("#log-dialog")


THEIR_PAGE = """
import http.server, sys
PAGE = b'<title>theirs</title><script>navigator.serviceWorker.register("/sw.js")</script>'
WORKER = b'''
self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));
self.addEventListener("fetch", (event) => {
  if (event.request.mode === "navigate")
    event.respondWith(new Response("<title>theirs</title>",
                                   {headers: {"content-type": "text/html"}}));
});
'''
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body, kind = (WORKER, "text/javascript") if self.path == "/sw.js" else (PAGE, "text/html")
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def title_of(page: Any) -> str | None:
    try:
        return str(page.title())
    except Exception:  # between two documents: the worker reloads the page
        return None


def test_a_service_worker_another_program_left_at_the_address_removes_itself(
        page: Any, data_dir: Path, tmp_path: Path, llm: FakeLLM) -> None:
    # A page another program served at Offload's address (a bookmark opened while Offload
    # was stopped) left a service worker. The browser kept it: it answered the dashboard's
    # address with its own page, and would have seen every request; a 404 for its script
    # left it in place.
    server = Server(data_dir, tmp_path / "server.log", {"OPENAI_BASE_URL": llm.base_url})
    theirs = subprocess.Popen([sys.executable, "-c", THEIR_PAGE, str(server.port)])
    try:
        wait_for(lambda: _in_their_workers_hands(page, server.url), 60, what="their worker")
    finally:
        theirs.terminate()
        theirs.wait(30)
    server.start()
    try:
        page.goto(server.url)  # theirs still: the browser checks the worker a moment later
        wait_for(lambda: title_of(page) == "Offload dashboard", 90, what="the dashboard")
        assert page.evaluate("navigator.serviceWorker.getRegistrations()") == []
        page.goto(server.url)
        assert title_of(page) == "Offload dashboard"
    finally:
        server.stop()


THEIR_CACHED_PAGE = """
import http.server, sys
# Its fetch caught: one that fails (no server at the address a moment) is theirs, not ours.
PAGE = (b'<title>theirs</title><script>fetch("/api/jobs").then((r) => r.text())'
        b'.then((text) => { document.title = "theirs: " + text.slice(0, 9); })'
        b'.catch(() => {})</script>')
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/api/"):  # asked of Offload, once it runs here
            self.send_response(404)
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Cache-Control", "max-age=31536000, immutable")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_a_page_another_program_left_in_the_cache_is_emptied_out_by_the_dashboard(
        page: Any, data_dir: Path, tmp_path: Path, llm: FakeLLM) -> None:
    # Cached for a year, a page another program served at Offload's address (a bookmark
    # opened while Offload was stopped) was shown at that address once Offload ran there,
    # and read its API as the address's own: every job and chat.
    from launcher.serve import fresh_url

    server = Server(data_dir, tmp_path / "server.log", {"OPENAI_BASE_URL": llm.base_url})
    theirs = subprocess.Popen([sys.executable, "-c", THEIR_CACHED_PAGE, str(server.port)])
    try:
        wait_for(lambda: _opened(page, server.url)
                 and (title_of(page) or "").startswith("theirs"), 60, what="their page")
    finally:
        theirs.terminate()
        theirs.wait(30)
    server.start()
    try:
        page.goto(fresh_url(server.url))  # as launch.py opens it
        wait_for(lambda: title_of(page) == "Offload dashboard", 30, what="the dashboard")
        bookmark = page.goto(server.url)
        time.sleep(1)  # their page's script would have read the API by now
        assert title_of(page) == "Offload dashboard"
        assert fresh_url(server.url) != fresh_url(server.url)
        # Only the address launch.py opens empties the cache (of every port of this host).
        assert bookmark is not None and "clear-site-data" not in bookmark.headers
        opened = httpx.get(fresh_url(server.url))
        assert opened.headers.get("clear-site-data") == '"cache"', opened.headers
    finally:
        server.stop()


def _in_their_workers_hands(page: Any, url: str) -> bool:
    # A worker takes the pages opened once it is active; on a slow machine the page that
    # registered it can be left while it installs, so the next one is opened.
    if not _opened(page, url):
        return False
    try:
        page.wait_for_function("navigator.serviceWorker.controller !== null", timeout=5_000)
    except Exception:  # not in control of this page yet
        return False
    return title_of(page) == "theirs"


def _opened(page: Any, url: str) -> bool:
    try:
        page.goto(url)
    except Exception:  # not listening yet
        return False
    return True


def test_token_is_asked_once_and_kept_for_the_tab(page: Any,
                                                  make_server: Callable[..., Server]) -> None:
    server = make_server(env={"OFFLOAD_API_TOKEN": "tab-secret-1-8f3a7c"})
    page.goto(server.url)
    page.wait_for_selector("#token-input", state="visible", timeout=15_000)
    page.fill("#token-input", "tab-secret-1-8f3a7c")
    page.press("#token-input", "Enter")
    # The history's samples come from a supervisor just started (a slow machine: slowly).
    page.wait_for_function("Number(document.querySelector('#history-chart')"
                           ".dataset.updates || 0) >= 2", timeout=60_000)
    page.reload()
    page.wait_for_function("Number(document.querySelector('#history-chart')"
                           ".dataset.updates || 0) >= 1", timeout=60_000)
    assert not page.is_visible("#token-input"), "asked once per tab"


def test_a_dismissed_token_form_stays_dismissed_until_asked_for(
        page: Any, make_server: Callable[..., Server]) -> None:
    # Escape closed it, and the next poll's 401 opened it again, nine times in ten seconds.
    server = make_server(env={"OFFLOAD_API_TOKEN": "tab-secret-2-4b9e1d"})
    page.goto(server.url)
    page.wait_for_selector("#token-input", state="visible", timeout=15_000)
    page.keyboard.press("Escape")
    page.wait_for_selector("#token-needed", state="visible", timeout=5_000)
    time.sleep(4)  # the pollers ask again and again, and are refused
    assert page.is_hidden("#token-dialog")
    page.click("#token-ask")
    page.fill("#token-input", "tab-secret-2-4b9e1d")
    page.press("#token-input", "Enter")
    page.wait_for_function("Number(document.querySelector('#history-chart')"
                           ".dataset.updates || 0) >= 2", timeout=15_000)
    assert page.is_hidden("#token-needed")


@pytest.mark.parametrize("refusal", ["wrong token", "form dismissed"])
def test_a_token_given_after_a_refusal_loads_the_conversation(
        page: Any, make_server: Callable[..., Server], llm: FakeLLM, refusal: str) -> None:
    # Its turns were asked for once, refused (401), and not again: the conversation
    # showed only after a reload, and the next question went without it.
    token = "tab-secret-3-7c2d9a"
    server = make_server(env={"OPENAI_BASE_URL": llm.base_url, "OFFLOAD_API_TOKEN": token})
    with server.client(headers={"Authorization": f"Bearer {token}"}) as client:
        first = stored_turn(client, "behind-a-token", "My name is Alice.")["id"]
    page.add_init_script("localStorage.setItem('offload-session', 'behind-a-token')")
    page.goto(server.url)
    page.wait_for_selector("#token-input", state="visible", timeout=15_000)
    if refusal == "wrong token":
        page.fill("#token-input", "not-the-token")
        page.press("#token-input", "Enter")
        page.wait_for_function("document.querySelector('#token-dialog').open && document"
                               ".querySelector('#token-note').textContent.includes('not accepted')",
                               timeout=15_000)
    else:
        page.keyboard.press("Escape")
        page.wait_for_selector("#token-needed", state="visible", timeout=5_000)
        page.click("#token-ask")
    page.fill("#token-input", token)
    page.press("#token-input", "Enter")
    page.wait_for_selector(f"#chat-log li[data-job-id='{first}'][data-state='completed']",
                           timeout=15_000)
    assert page.text_content("#chat-forget-note") == ""
    page.wait_for_function("!document.querySelector('#chat-send').disabled", timeout=10_000)
    page.fill("#chat-input", "What is my name?")
    page.press("#chat-input", "Enter")
    completed_shown(page, 2)
    asked = [m["content"] for m in llm.requests[-1]["body"]["messages"] if m["role"] == "user"]
    assert asked == ["My name is Alice.", "What is my name?"], asked


def test_jobs_table_shows_a_chats_tokens(page: Any, server: Server) -> None:
    job_id = httpx.post(f"{server.url}/api/ai_chat_async", json={
        "messages": [{"role": "user", "content": "hi"}]}).json()["job_id"]
    page.goto(server.url)
    row = f"#jobs-table tr[data-job-id='{job_id}']"
    page.wait_for_selector(f"{row}[data-state='completed']", timeout=30_000)
    tokens = page.text_content(f"{row} td[data-col=tokens]") or ""
    # The scripted server reports no usage: counted (~), one token a piece.
    assert re.fullmatch(rf"~\d+ → ~{len(REPLY)} · [\d.]+/s", tokens), tokens


class CuttingProxy:
    """A TCP relay in front of the server whose open connections can be cut at once, as
    a dropped network or a killed proxy cuts them."""

    def __init__(self, port: int) -> None:
        self.upstream = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.open: set[socket.socket] = set()
        self.closed = False
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.closed:
                    client.close()
                    server.close()
                    return
                self.open |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        self._close(source, sink)

    def _close(self, *sockets: socket.socket) -> None:
        for sock in sockets:
            with self.lock:
                self.open.discard(sock)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def cut(self) -> None:
        with self.lock:
            cut = list(self.open)
        self._close(*cut)

    def close(self) -> None:
        with self.lock:
            self.closed = True
        self.listener.close()
        self.cut()


LAST_REPLY_TEXT = ("document.querySelector('#chat-log li.msg.assistant:last-child .text')"
                   "?.textContent ?? ''")


def test_a_reply_goes_on_after_the_connection_drops(page: Any,
                                                    make_server: Callable[..., Server]) -> None:
    """Mid-reply the connection is cut and the browser is offline for a moment: the page
    follows the stream again from its last event id, and the reply it shows is the
    job's, no piece missing, none twice, at every moment."""
    pieces = [f"p{i} " for i in range(50)] + ["end."]
    with FakeLLM(pieces=pieces, delay_s=0.1) as slow:
        server = make_server(env={"OPENAI_BASE_URL": slow.base_url})
        proxy = CuttingProxy(server.port)
        streams: list[str | None] = []
        polled: list[str] = []

        def record(request: Any) -> None:
            if request.url.endswith("/events"):
                streams.append(request.headers.get("last-event-id"))
            elif "/api/ai_chat_result/" in request.url:
                polled.append(request.url)

        page.on("request", record)
        try:
            page.goto(proxy.url)
            page.fill("#chat-input", "Tell me a long story.")
            page.press("#chat-input", "Enter")
            page.wait_for_function(f"({LAST_REPLY_TEXT}).includes('p5 ')", timeout=30_000)
            page.context.set_offline(True)
            proxy.cut()
            seen = [page.evaluate(LAST_REPLY_TEXT)]
            deadline = time.monotonic() + 1.5  # the reply goes on on the server meanwhile
            while time.monotonic() < deadline:
                seen.append(page.evaluate(LAST_REPLY_TEXT))
                time.sleep(0.05)
            page.context.set_offline(False)
            reply = page.locator("#chat-log li.msg.assistant").last
            deadline = time.monotonic() + 60
            while (time.monotonic() < deadline
                   and reply.get_attribute("data-state") != "completed"):
                seen.append(page.evaluate(LAST_REPLY_TEXT))
                time.sleep(0.05)
            job_id = reply.get_attribute("data-job-id")
            job = httpx.get(f"{server.url}/api/jobs/{job_id}").json()
            shown = page.evaluate(LAST_REPLY_TEXT)
        finally:
            proxy.close()
    assert reply.get_attribute("data-state") == "completed"
    assert job["output"] == "".join(pieces)
    assert shown == job["output"], "no gap, nothing twice"
    assert all(job["output"].startswith(text) for text in seen), \
        [text for text in seen if not job["output"].startswith(text)][:1]
    assert streams[0] is None and any(streams[1:]), f"followed again from an id: {streams}"
    assert polled == [], "the reply came from the stream, not from polling"


def test_a_reply_whose_stream_was_refused_once_goes_on_streaming(
        page: Any, make_server: Callable[..., Server]) -> None:
    # Refused once (every stream of the server taken: a 503; a proxy's 502 while the server
    # restarted), the reply was polled to its end: it stood still until it had ended.
    pieces = [f"p{i} " for i in range(40)] + ["end."]
    with FakeLLM(pieces=pieces, delay_s=0.2) as slow:
        server = make_server(env={"OPENAI_BASE_URL": slow.base_url})
        streams: list[str] = []

        def refuse_first(route: Any) -> None:
            streams.append(route.request.url)
            if len(streams) == 1:
                route.fulfill(status=503, content_type="application/json",
                              headers={"Retry-After": "1"},
                              body='{"detail": "too many open event streams"}')
            else:
                route.continue_()

        page.route("**/events", refuse_first)
        page.goto(server.url)
        page.fill("#chat-input", "Tell me a long story.")
        page.press("#chat-input", "Enter")
        reply = page.locator("#chat-log li.msg.assistant").last
        seen: set[str] = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and reply.get_attribute("data-state") != "completed":
            seen.add(page.evaluate(LAST_REPLY_TEXT))
            page.wait_for_timeout(50)
    assert reply.get_attribute("data-state") == "completed"
    assert page.evaluate(LAST_REPLY_TEXT) == "".join(pieces)
    partial = {text for text in seen if text and not text.endswith("end.")}
    assert len(partial) >= 3, f"it went on showing as it came: {sorted(partial)[:5]}"
    assert len(streams) >= 2, "the stream was asked for again"


def test_every_live_turn_is_followed_after_a_reload(page: Any,
                                                    make_server: Callable[..., Server]) -> None:
    """A session has an answering turn and one queued behind it when the page reloads:
    both are followed from the stream to their end, the second once it starts."""
    with FakeLLM(pieces=REPLY, delay_s=0.05, gated="first question") as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url})
        polled: list[str] = []
        page.on("request", lambda request: polled.append(request.url)
                if "/api/ai_chat_result/" in request.url else None)
        try:
            with server.client() as client:
                def ask(question: str) -> str:
                    return str(client.post("/api/ai_chat_async", json={
                        "messages": [{"role": "user", "content": question}],
                        "session_id": "two-turns"}).json()["job_id"])

                first = ask("first question")
                wait_job(client, first, "running")
                second = ask("second question")
                page.goto(server.url)
                page.evaluate("localStorage.setItem('offload-session', 'two-turns')")
                page.reload()
                for job_id in (first, second):
                    page.wait_for_selector(f"#chat-log li[data-job-id='{job_id}']")
                waiting = client.get(f"/api/jobs/{second}").json()
                llm.gate.set()
                jobs = [wait_job(client, job_id) for job_id in (first, second)]
                for job_id in (first, second):
                    page.wait_for_selector(
                        f"#chat-log li[data-job-id='{job_id}'][data-state='completed']",
                        timeout=30_000)
                shown = [page.text_content(f"#chat-log li[data-job-id='{job_id}'] .text")
                         for job_id in (first, second)]
        finally:
            llm.gate.set()
    assert waiting["state"] == "queued" and waiting["after"] == first, waiting
    assert [job["state"] for job in jobs] == ["completed", "completed"]
    assert shown == [job["result"]["reply"] for job in jobs]
    assert polled == [], "the replies came from the stream, not from polling"
    assert page.is_enabled("#chat-send") and page.is_hidden("#chat-cancel")



HIDE_PAGE = """hidden => {
    Object.defineProperty(document, "hidden", {configurable: true, get: () => hidden});
    document.dispatchEvent(new Event("visibilitychange"));
}"""


def test_a_page_holds_two_streams_at_most(page: Any, make_server: Callable[..., Server]) -> None:
    """A browser opens six connections to a host, for all its tabs: a stream for each
    live turn (and a training) took them all, and every request of every tab waited.
    Four live turns: two streams at a time, and each turn shows its reply."""
    with FakeLLM(pieces=REPLY, delay_s=0.05, gated="question 0") as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url})
        open_streams: set[Any] = set()
        page.on("request", lambda request: open_streams.add(request)
                if request.url.endswith("/events") else None)
        page.on("requestfinished", lambda request: open_streams.discard(request))
        page.on("requestfailed", lambda request: open_streams.discard(request))
        try:
            with server.client() as client:
                ids = [str(client.post("/api/ai_chat_async", json={
                    "messages": [{"role": "user", "content": f"question {n}"}],
                    "session_id": "four-turns"}).json()["job_id"]) for n in range(4)]
                wait_job(client, ids[0], "running")
                page.goto(server.url)
                page.evaluate("localStorage.setItem('offload-session', 'four-turns')")
                page.reload()
                for job_id in ids:
                    page.wait_for_selector(f"#chat-log li[data-job-id='{job_id}']")
                deadline = time.monotonic() + 20
                while len(open_streams) < 2 and time.monotonic() < deadline:
                    page.wait_for_timeout(100)
                page.wait_for_timeout(1000)  # room for more, had the page opened more
                held = len(open_streams)  # the first turn answering, the rest queued
                # Hidden behind another tab (as the browser says it), it holds none.
                page.evaluate(HIDE_PAGE, True)
                deadline = time.monotonic() + 10
                while open_streams and time.monotonic() < deadline:
                    page.wait_for_timeout(100)
                hidden = len(open_streams)
                page.evaluate(HIDE_PAGE, False)
                llm.gate.set()
                for job_id in ids:
                    page.wait_for_selector(
                        f"#chat-log li[data-job-id='{job_id}'][data-state='completed']",
                        timeout=60_000)
                jobs = [wait_job(client, job_id) for job_id in ids]
                shown = [page.text_content(f"#chat-log li[data-job-id='{job_id}'] .text")
                         for job_id in ids]
        finally:
            llm.gate.set()
    assert (held, hidden) == (2, 0)
    assert shown == [job["result"]["reply"] for job in jobs]


def test_a_reply_waiting_for_a_stream_slot_shows_its_jobs_state(
        page: Any, make_server: Callable[..., Server]) -> None:
    # Both of the page's streams taken, a turn waiting for one said "queued…" by its job's
    # first state, whatever became of the job: cancelled from the Jobs table, it counted on.
    with FakeLLM(pieces=REPLY, delay_s=0.05, gated="question 0") as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url})
        try:
            with server.client() as client:
                ids = [str(client.post("/api/ai_chat_async", json={
                    "messages": [{"role": "user", "content": f"question {n}"}],
                    "session_id": "slots-taken"}).json()["job_id"]) for n in range(4)]
                wait_job(client, ids[0], "running")
                page.goto(server.url)
                page.evaluate("localStorage.setItem('offload-session', 'slots-taken')")
                page.reload()
                for job_id in ids:
                    page.wait_for_selector(f"#chat-log li[data-job-id='{job_id}']")
                # The first two hold the streams; the third is cancelled meanwhile.
                assert client.delete(f"/api/jobs/{ids[2]}").json()["state"] == "cancelled"
                page.wait_for_selector(f"#chat-log li[data-job-id='{ids[2]}']"
                                       "[data-state='cancelled']", timeout=20_000)
                still = [client.get(f"/api/jobs/{job_id}").json()["state"] for job_id in ids]
                llm.gate.set()
                page.wait_for_selector(f"#chat-log li[data-job-id='{ids[3]}']"
                                       "[data-state='completed']", timeout=30_000)
        finally:
            llm.gate.set()
    assert still == ["running", "queued", "cancelled", "queued"], "the streams were taken"


def rows_shown(page: Any) -> list[str]:
    return list(page.eval_on_selector_all("#jobs-table tbody tr[data-job-id]",
                                     "rows => rows.map(r => r.dataset.jobId)"))


def wait_rows(page: Any, ids: set[str], timeout: float = 30) -> None:
    """Wait until the table shows exactly `ids`."""
    deadline = time.monotonic() + timeout
    while set(shown := rows_shown(page)) != ids:
        assert time.monotonic() < deadline, f"rows {shown}, wanted {sorted(ids)}"
        time.sleep(0.1)


def submit(server: Server, kind: str, **job_input: Any) -> str:
    answer = httpx.post(f"{server.url}/api/jobs", json={"kind": kind, "input": job_input})
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def test_jobs_filters_keep_refreshing_and_cancel_several(page: Any, server: Server) -> None:
    failed = submit(server, "probe", fail="disk on fire")
    done = submit(server, "sleep", seconds=0.1)
    live = [submit(server, "sleep", seconds=300) for _ in range(3)]
    page.goto(server.url)
    wait_rows(page, {failed, done, *live})
    page.wait_for_selector(f"tr[data-job-id='{failed}'][data-state='failed']", timeout=20_000)
    assert page.locator(f"tr[data-job-id='{failed}'] input.select-job").count() == 0, \
        "a finished job cannot be ticked for cancelling"

    page.select_option("#filter-kind", "probe")  # a kind the page learnt from the list
    wait_rows(page, {failed})
    page.select_option("#filter-kind", "")
    page.fill("#filter-text", "FIRE")  # the error's text, any case
    wait_rows(page, {failed})
    page.fill("#filter-text", done[:8])
    wait_rows(page, {done})
    page.fill("#filter-text", "")
    page.select_option("#filter-state", "running")
    wait_rows(page, set(live))
    later = submit(server, "sleep", seconds=300)
    wait_rows(page, {*live, later})  # the filtered table stays live

    for job_id in live[:2]:
        page.check(f"tr[data-job-id='{job_id}'] input.select-job")
    assert page.text_content("#cancel-selected") == "Cancel selected (2)"
    page.click("#cancel-selected")
    wait_rows(page, {live[2], later})
    page.wait_for_function("document.querySelector('#jobs-note').textContent"
                           ".includes('Cancelled 2 jobs.')", timeout=10_000)
    states = {job_id: httpx.get(f"{server.url}/api/jobs/{job_id}").json()["state"]
              for job_id in [*live, later]}
    assert states == {live[0]: "cancelled", live[1]: "cancelled", live[2]: "running",
                      later: "running"}
    page.check("#select-all")
    assert page.text_content("#cancel-selected") == "Cancel selected (2)"
    page.click("#cancel-selected")
    wait_rows(page, set())
    assert "No jobs match" in page.inner_text("#jobs-table tbody")


def test_a_finished_job_runs_again_with_edited_input(page: Any, server: Server) -> None:
    first = submit(server, "sleep", seconds=0.1)
    page.goto(server.url)
    row = f"#jobs-table tr[data-job-id='{first}']"
    page.wait_for_selector(f"{row}[data-state='completed']", timeout=20_000)
    page.click(f"{row} button.rerun-job")
    assert page.is_visible("#rerun-dialog")
    page.wait_for_function("document.querySelector('#rerun-input').value"
                           ".includes('\"seconds\": 0.1')", timeout=10_000)

    page.fill("#rerun-input", "{not json")
    page.click("#rerun-submit")
    page.wait_for_function("document.querySelector('#rerun-error').textContent"
                           ".includes('not valid JSON')", timeout=10_000)
    bad = {"input": {"seconds": -5}}
    page.fill("#rerun-input", '{"seconds": -5}')
    page.click("#rerun-submit")
    refused = httpx.post(f"{server.url}/api/jobs/{first}/rerun", json=bad)
    assert refused.status_code == 422
    page.wait_for_function("expected => document.querySelector('#rerun-error').textContent"
                           " === expected", arg=refused.json()["detail"], timeout=10_000)
    assert page.is_visible("#rerun-dialog"), "the dialog stays open to fix the input"
    assert page.get_attribute("#rerun-input", "aria-invalid") == "true"

    page.fill("#rerun-input", '{"seconds": 0.2}')
    page.click("#rerun-submit")
    page.wait_for_selector("#rerun-dialog", state="hidden", timeout=10_000)
    again = [job for job in httpx.get(f"{server.url}/api/jobs").json()["jobs"]
             if job["rerun_of"] == first]
    assert len(again) == 1 and again[0]["input"] == {"seconds": 0.2}
    notes = page.text_content(f"#jobs-table tr[data-job-id='{again[0]['id']}'] "
                              "td[data-col=notes]", timeout=10_000)
    assert notes == f"re-run of {first[:8]}"
    assert f"a re-run of {first}" in (page.text_content("#jobs-note") or "")
    assert page.evaluate("document.activeElement.classList.contains('rerun-job')"), \
        "focus goes back to the button that opened the dialog"

    # Removed from the page, as `offload remove`: once agreed to, and for good.
    page.wait_for_selector(f"{row} button.remove-job", timeout=10_000)
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.click(f"{row} button.remove-job")
    assert httpx.get(f"{server.url}/api/jobs/{first}").status_code == 200, "not agreed to"
    asked: list[str] = []

    def agree(dialog: Any) -> None:
        asked.append(dialog.message)
        dialog.accept()

    page.once("dialog", agree)
    page.click(f"{row} button.remove-job")
    page.wait_for_selector(row, state="detached", timeout=10_000)
    assert asked == [f"Remove job {first[:8]} with its input, output and log? This cannot be "
                     "undone."]
    assert httpx.get(f"{server.url}/api/jobs/{first}").status_code == 404
    assert f"Removed job {first[:8]}." in (page.text_content("#jobs-note") or "")


def test_the_table_polls_jobs_without_their_input_and_a_rerun_shows_it_whole(
        page: Any, server: Server) -> None:
    """Fifty chats of long conversations were 45 MB a poll: the table lists its jobs
    summarised, and the re-run dialog asks for its one job in full."""
    conversation = [{"role": "user" if i % 2 == 0 else "assistant",
                     "content": f"turn {i} " + "x" * 90_000} for i in range(4)]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        chat = client.post("/api/jobs", json={"kind": "chat", "input": {
            "messages": conversation, "expert": False}}).json()["id"]
        assert wait_job(client, chat)["state"] == "completed"
    finished: list[Any] = []
    page.on("requestfinished", lambda request: finished.append(request))
    page.goto(server.url)
    row = f"#jobs-table tr[data-job-id='{chat}']"
    page.wait_for_selector(f"{row}[data-state='completed']", timeout=20_000)
    assert page.text_content(f"{row} td[data-col=tokens]") != "—", "the result's usage kept"

    def listings() -> list[Any]:
        return [each for each in finished if each.url.split("?")[0].endswith("/api/jobs")]

    deadline = time.monotonic() + 15
    while len(listings()) < 3:  # the page's events come while Playwright is called
        assert time.monotonic() < deadline, f"the table's next polls: {len(listings())}"
        page.wait_for_timeout(100)
    for listing in listings():
        assert "fields=summary" in listing.url, listing.url
        assert listing.sizes()["responseBodySize"] < 5_000, listing.url
    page.fill("#filter-text", "TURN 0")  # the start of its input, as listed
    wait_rows(page, {chat})
    page.fill("#filter-text", "")

    page.click(f"{row} button.rerun-job")
    page.wait_for_function("document.querySelector('#rerun-input').value.includes('turn 3')",
                           timeout=10_000)
    shown = json.loads(page.input_value("#rerun-input"))
    assert shown == {"messages": conversation, "expert": False}
    assert page.text_content("#rerun-error") == ""
    assert page.is_enabled("#rerun-submit") and page.is_editable("#rerun-input")
    whole = [each for each in finished if each.url.endswith(f"/api/jobs/{chat}")]
    assert len(whole) == 1 and whole[0].sizes()["responseBodySize"] > 360_000


@pytest.mark.timeout(400)
def test_train_waits_for_enough_history_on_a_fresh_start(
        page: Any, make_server: Callable[..., Server]) -> None:
    """A fresh data folder has no history: the Train button says how long until it has
    enough, submits nothing meanwhile, and trains once it has."""
    server = make_server(env={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    submitted: list[float] = []
    page.on("request", lambda request: submitted.append(time.monotonic())
            if request.method == "POST" and request.url.endswith("/api/jobs") else None)
    page.goto(server.url)
    page.wait_for_function("document.querySelector('#train-start').textContent"
                           ".includes('enough history in')", timeout=20_000)
    label = page.text_content("#train-start") or ""
    assert re.fullmatch(r"Train \(enough history in \d+ (s|min)\)", label), label
    assert page.is_disabled("#train-start")
    page.evaluate("document.querySelector('#train-start').click()")
    page.wait_for_function("!document.querySelector('#train-start').disabled", timeout=300_000)
    enabled_at = time.monotonic()
    assert submitted == [], "nothing is submitted while the history is short"
    history = httpx.get(f"{server.url}/api/history").json()["metrics"]
    assert history["kept"] >= history["train_needs"]
    assert page.text_content("#train-start") == "Train model"
    page.click("#train-start")
    page.wait_for_function("/completed|failed/.test(document.querySelector('#train-status')"
                           ".textContent)", timeout=120_000)
    assert page.text_content("#train-status") == "completed"
    assert len(submitted) == 1 and submitted[0] >= enabled_at


AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa", "best-practice"]


SCHEDULES = """
[nightly-train]
kind = "sleep"
every = "6h"
input = {seconds = 0}
"""


def with_schedules(make_server: Callable[..., Server], tmp_path: Path,
                   **env: str) -> Server:
    path = tmp_path / "schedules.toml"
    path.write_text(SCHEDULES)
    return make_server(env={"OFFLOAD_SCHEDULES_FILE": str(path), **env})


def note_of(page: Any, job_id: str) -> str:
    return str(page.text_content(f"#jobs-table tr[data-job-id='{job_id}'] td[data-col=notes]",
                                 timeout=20_000))


def test_retries_start_times_queue_pause_and_schedules_are_shown_and_steered(
        page: Any, make_server: Callable[..., Server], tmp_path: Path) -> None:
    server = with_schedules(make_server, tmp_path, OFFLOAD_RETRY_BASE_S="600",
                            OFFLOAD_RETRY_MAX_S="600")
    retried = httpx.post(f"{server.url}/api/jobs", json={
        "kind": "probe", "input": {"exit_code": 9}, "max_attempts": 2}).json()["id"]
    later = httpx.post(f"{server.url}/api/jobs", json={
        "kind": "sleep", "input": {"seconds": 0}, "delay_s": 7200, "priority": 5}).json()["id"]
    dependent = httpx.post(f"{server.url}/api/jobs", json={
        "kind": "sleep", "input": {"seconds": 0}, "depends_on": later}).json()["id"]
    on_two = httpx.post(f"{server.url}/api/jobs", json={
        "kind": "sleep", "input": {"seconds": 0}, "depends_on": [later, dependent]}).json()["id"]
    page.goto(server.url)
    page.wait_for_function("id => { const c = document.querySelector("
                           "`#jobs-table tr[data-job-id='${id}'] td[data-col=notes]`);"
                           " return c && c.textContent.includes('retrying in'); }",
                           arg=retried, timeout=30_000)
    assert note_of(page, retried).startswith("attempt 2 of 2 · retrying in ")
    assert "earlier: lost" in note_of(page, retried)
    assert note_of(page, later) == "starts in 2 h · priority 5"
    assert note_of(page, dependent) == f"after {later[:8]}"
    assert note_of(page, on_two) == "after 2 jobs"

    # The schedule is listed with its next run, paused and resumed from the page.
    row = "#schedules-section tr[data-schedule='nightly-train']"
    page.wait_for_selector(row, timeout=20_000)
    page.click(f"{row} button.toggle-schedule")
    page.wait_for_selector(f"{row}[data-paused='true']", timeout=10_000)
    assert httpx.get(f"{server.url}/api/schedules").json()["schedules"][0]["paused"] is True
    page.click(f"{row} button.toggle-schedule")
    page.wait_for_selector(f"{row}[data-paused='false']", timeout=10_000)
    # A change to the file that cannot be used is said above the schedules, which go on.
    assert page.is_hidden("#schedules-error")
    (tmp_path / "schedules.toml").write_text(SCHEDULES.replace('"sleep"', '"nope"'))
    page.wait_for_selector("#schedules-error:not([hidden])", timeout=30_000)
    assert "unknown job kind 'nope'" in page.text_content("#schedules-error")
    assert page.is_visible(row)

    # The queue paused from the page: a new job waits, and runs once resumed.
    page.click("#queue-toggle")
    page.wait_for_function("document.querySelector('#queue-toggle').textContent"
                           " === 'Resume queue'", timeout=10_000)
    assert httpx.get(f"{server.url}/api/queue").json()["paused"] is True
    waiting = submit(server, "sleep", seconds=0)
    time.sleep(2)
    assert httpx.get(f"{server.url}/api/jobs/{waiting}").json()["state"] == "queued"
    page.click("#queue-toggle")
    page.wait_for_selector(f"#jobs-table tr[data-job-id='{waiting}'][data-state='completed']",
                           timeout=30_000)

    # How many jobs run at once, changed from the page as `offload parallel` does.
    default = httpx.get(f"{server.url}/api/queue").json()["max_concurrent_default"]
    page.wait_for_function(f"document.querySelector('#queue-cap').value === '{default}'",
                           timeout=10_000)
    page.fill("#queue-cap", "3")
    page.press("#queue-cap", "Enter")
    wait_for(lambda: httpx.get(f"{server.url}/api/queue").json()["max_concurrent"] == 3,
             10, 0.1, "the cap set from the page")
    page.wait_for_function("document.querySelector('[data-field=max]').textContent === '3'",
                           timeout=10_000)
    assert page.text_content("[data-field=storage]") == "ok"  # the data folder can be written
    jobs_dir = server.data_dir / "jobs"
    subprocess.run(["chattr", "+i", str(jobs_dir)], check=True)  # as a full disk refuses
    try:
        refused = httpx.post(f"{server.url}/api/jobs", json={"kind": "sleep"})
        assert refused.status_code == 503, refused.text
        page.wait_for_function("document.querySelector('[data-field=storage]').textContent"
                               ".startsWith('the data folder failed a request')",
                               timeout=20_000)
        assert page.get_attribute("[data-field=storage]", "class") == "warn"
    finally:
        subprocess.run(["chattr", "-i", str(jobs_dir)], check=True)
    page.fill("#queue-cap", "0")  # below its minimum: the browser keeps it from being sent
    assert page.evaluate("document.querySelector('#queue-cap').validity.valid") is False
    page.press("#queue-cap", "Enter")
    time.sleep(1)
    assert httpx.get(f"{server.url}/api/queue").json()["max_concurrent"] == 3
    page.click("#queue-cap-default")  # shown while a cap is set
    wait_for(lambda: not httpx.get(f"{server.url}/api/queue").json()["max_concurrent_set"],
             10, 0.1, "the setting's cap again")
    page.wait_for_selector("#queue-cap-default", state="hidden", timeout=10_000)
    assert page.input_value("#queue-cap") == str(default)

    # One kind's cap, as `offload parallel N --kind K`: every kind is offered, a kind
    # without a cap of its own shows none, and its cap goes back to none.
    queue = httpx.get(f"{server.url}/api/queue").json()
    offered = page.eval_on_selector_all("#queue-cap-kind option", "os => os.map(o => o.value)")
    assert offered == ["", *queue["kinds"]] and {"chat", "probe", "sleep"} <= set(offered)
    page.select_option("#queue-cap-kind", "sleep")
    assert (page.input_value("#queue-cap"), page.is_hidden("#queue-cap-default")) == ("", True)
    page.fill("#queue-cap", "1")
    page.press("#queue-cap", "Enter")
    wait_for(lambda: httpx.get(f"{server.url}/api/queue").json()["kind_caps_set"] == ["sleep"],
             10, 0.1, "the kind's cap set from the page")
    assert httpx.get(f"{server.url}/api/queue").json()["kind_caps"]["sleep"] == 1
    assert httpx.get(f"{server.url}/api/queue").json()["max_concurrent_set"] is False
    page.wait_for_selector("#queue-cap-default:not([hidden])", timeout=10_000)
    # A job its kind's cap holds back says so, as `offload list` does (its note was "—").
    both = [httpx.post(f"{server.url}/api/jobs", json={
        "kind": "sleep", "input": {"seconds": 60}}).json()["id"] for _ in range(2)]
    page.wait_for_function("id => { const c = document.querySelector("
                           "`#jobs-table tr[data-job-id='${id}'] td[data-col=notes]`);"
                           " return c && c.textContent.startsWith('held'); }",
                           arg=both[1], timeout=30_000)
    assert note_of(page, both[1]) == "held: kind sleep at its cap 1"
    # Room under the cap that jobs queued before it take: said as the CLI says it.
    assert page.evaluate("""async () => {
        const { notes } = await import('/jobs.js');
        return notes({state: "queued", kind: "sleep", waits_for: {
            reason: "kind_cap", kind_cap: 3, running: 1}});
    }""") == "held: kind sleep's cap 3 (1 running, 2 queued before it)"
    for job_id in both:
        httpx.delete(f"{server.url}/api/jobs/{job_id}").raise_for_status()
    page.select_option("#queue-cap-kind", "")  # the cap on all is shown again, untouched
    assert page.input_value("#queue-cap") == str(default)
    assert page.is_hidden("#queue-cap-default")
    page.select_option("#queue-cap-kind", "sleep")
    assert page.input_value("#queue-cap") == "1"
    page.click("#queue-cap-default")
    wait_for(lambda: httpx.get(f"{server.url}/api/queue").json()["kind_caps_set"] == [],
             10, 0.1, "no cap of its own again")
    assert "sleep" not in httpx.get(f"{server.url}/api/queue").json()["kind_caps"]
    page.wait_for_selector("#queue-cap-default", state="hidden", timeout=10_000)
    assert page.input_value("#queue-cap") == ""


def test_a_schedules_next_run_counts_down(page: Any, make_server: Callable[..., Server],
                                          tmp_path: Path) -> None:
    # The rows were rebuilt only when a schedule changed: "in 50m 33s" stood for an hour.
    path = tmp_path / "schedules.toml"
    path.write_text(SCHEDULES.replace('"6h"', '"1h"') + '[berlin]\nkind = "sleep"\n'
                    'cron = "30 2 * * *"\ntimezone = "Europe/Berlin"\n')
    server = make_server(env={"OFFLOAD_SCHEDULES_FILE": str(path)})
    page.goto(server.url)
    row = "#schedules-section tr[data-schedule='nightly-train']"
    cron_row = "#schedules-section tr[data-schedule='berlin']"
    assert page.text_content(f"{cron_row} td:nth-child(3)", timeout=30_000) == (
        "30 2 * * * (Europe/Berlin)")
    assert page.text_content(f"{row} td:nth-child(3)") == "every 1h 0m"
    page.wait_for_function(f"document.querySelector(\"{row} td:nth-child(5)\")"
                           "?.textContent.endsWith('completed')", timeout=30_000)
    time.sleep(5)  # that slot's job done: the schedule does not change for an hour
    cell = f"{row} td:nth-child(4)"
    first = page.text_content(cell)
    page.wait_for_function("([cell, first]) => document.querySelector(cell).textContent"
                           " !== first", arg=[cell, first], timeout=15_000)
    assert str(page.text_content(cell)).startswith("in ")


def test_a_schedule_that_cannot_be_paused_says_why(page: Any, make_server: Callable[..., Server],
                                                   tmp_path: Path) -> None:
    # Its 503 went unsaid: the row went on showing it running, its button as it was.
    server = with_schedules(make_server, tmp_path)
    page.goto(server.url)
    row = "#schedules-section tr[data-schedule='nightly-train']"
    page.wait_for_selector(row, timeout=30_000)
    switches = server.data_dir / "schedules"
    wait_for(switches.is_dir, 20, 0.1, "the schedules' folder (its first job's record)")
    subprocess.run(["chattr", "+i", str(switches)], check=True)  # as a full disk refuses
    try:
        page.click(f"{row} button.toggle-schedule")
        page.wait_for_selector("#schedules-switch-error:not([hidden])", timeout=10_000)
        said = page.text_content("#schedules-switch-error") or ""
        assert said.startswith("Could not pause schedule nightly-train: cannot record the "
                               f"switch in {switches}: "), said
        assert "check that the data folder is writable" in said, said
        assert page.get_attribute(row, "data-paused") == "false"
    finally:
        subprocess.run(["chattr", "-i", str(switches)], check=True)
    page.click(f"{row} button.toggle-schedule")
    page.wait_for_selector(f"{row}[data-paused='true']", timeout=10_000)
    assert page.is_hidden("#schedules-switch-error")


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_the_page_passes_an_axe_audit(browser: Any, make_server: Callable[..., Server],
                                      tmp_path: Path, scheme: str) -> None:
    """With jobs in the table, the schedules and the queue's control shown and the dialogs
    closed, then the re-run dialog open with an error in it."""
    from axe_playwright_python.sync_playwright import Axe  # type: ignore[import-untyped]  # ships no type hints

    server = with_schedules(make_server, tmp_path)
    submit(server, "probe", fail="no")
    submit(server, "sleep", seconds=300)  # a live row: its checkbox and Cancel button
    httpx.post(f"{server.url}/api/jobs", json={"kind": "sleep", "input": {}, "delay_s": 600})
    context = browser.new_context(viewport={"width": 1200, "height": 900},
                                  color_scheme=scheme)
    page = context.new_page()
    page.goto(server.url)
    page.wait_for_selector("#jobs-table tr[data-state='failed']", timeout=20_000)
    page.wait_for_selector("#jobs-table tr[data-state='running']", timeout=20_000)
    page.wait_for_function("!document.querySelector('#train-start').textContent"
                           ".includes('checking')", timeout=20_000)
    page.wait_for_selector("#schedules-section tr[data-schedule='nightly-train']",
                           timeout=20_000)
    page.wait_for_selector("#queue-toggle", timeout=20_000)
    options = {"runOnly": {"type": "tag", "values": AXE_TAGS}}
    closed = Axe().run(page, options=options).response["violations"]
    page.click("#jobs-table tr[data-state='failed'] button.rerun-job")
    page.fill("#rerun-input", "{")
    page.click("#rerun-submit")
    page.wait_for_selector("#rerun-error:has-text('not valid JSON')")
    dialog = Axe().run(page, options=options).response["violations"]
    context.close()
    found = [(v["id"], v["impact"], [n["target"] for n in v["nodes"]][:5], v["help"])
             for v in closed + dialog]
    assert found == [], found


def test_why_a_job_ended_is_shown_and_jobs_past_the_newest_are_found(
        page: Any, make_server: Callable[..., Server]) -> None:
    # A timeout's reason was nowhere on the page (its log is empty), and a job past the 50
    # newest was "No jobs match." with no way to look further.
    server = make_server()
    timed_out = httpx.post(f"{server.url}/api/jobs", json={
        "kind": "sleep", "input": {"seconds": 30}, "timeout_s": 1}).json()["id"]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        ended = wait_job(client, timed_out)
        assert ended["state"] == "timeout"
        client.post("/api/queue/pause").raise_for_status()
        for _ in range(50):  # they wait in the paused queue
            client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}})
    page.goto(server.url)
    page.fill("#filter-text", timed_out[:8])
    page.wait_for_function("document.querySelector('#jobs-note').textContent"
                           " === 'No jobs match of the newest 50 listed.'", timeout=20_000)
    page.click("#jobs-older")
    assert note_of(page, timed_out) == f"timeout: {ended['error']['message']}"
    page.wait_for_function("document.querySelector('#jobs-note').textContent"
                           " === '1 job matches.'", timeout=20_000)
    assert page.is_hidden("#jobs-older")
