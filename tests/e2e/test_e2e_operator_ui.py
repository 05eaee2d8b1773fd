"""E2E: the Edge agents page and REST API, explain, and task logs in the UI (issue 7, hosted side).

Runs against the session stack (``conftest.py``): its api-server mounts the plugin's page at
``/edge-agents/``. The page is checked in Debian's headless Chromium driven by Playwright: each
check takes a screenshot under the test's tmp dir and names it in the failure message.

* The page lists agents (name, queues, status); drain and resume from the page change the agent's
  state (and its next heartbeat reply); inside Airflow's own UI (Admin > Edge agents, an iframe),
  revoke asks for a second click, then revokes the agent.
* Explain, on the page and through REST, gives the reason a task on an unserved queue waits.
* Authentication: the session stack lets every request in as admin (SimpleAuthManager all-admins),
  so a second api-server on the same database runs with real users: no credential is 401, a viewer
  reads but cannot drain (403), an admin can; a viewer's page shows no buttons.
* Logs: a running agent task's log is readable through ``/api/v2/.../logs/1`` from the shipped
  chunks; a task of a ``logs = local`` queue shows where its log is (agent, path), while it runs and
  after, and its own lines never reach the hosted side. Airflow's task log view shows the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from conftest import MARKER_ENV, REGION
from localstack import AgentProcess, LocalStack, StackError, free_port, tail, write_private

pytestmark = pytest.mark.e2e

PAGE = "/edge-agents/"
API = "/edge-agents/api/v1"
LOCAL_QUEUE = "e2e_local_logs"
UI_AGENT = "e2e-ui-local"
DAG_LOGS = "e2e_operator_ui"
DAG_UNSERVED = "e2e_unserved_queue"
NOTICE = "This task's log stays in the agent's region"
UI_TIMEOUT_MS = 30_000
_BIN = Path(sys.executable).parent


# -------------------------------------------------------------------------------------------------
# Fixtures
# -------------------------------------------------------------------------------------------------


def airflow_cli(stack: LocalStack, *args: str) -> str:
    done = subprocess.run(
        [str(_BIN / "airflow"), *args], env=stack.env, cwd=stack.home, capture_output=True, text=True,
        timeout=300, stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        pytest.fail(f"airflow {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}", pytrace=False)
    return done.stdout


@pytest.fixture(scope="module")
def ui_agent(stack: LocalStack) -> Iterator[AgentProcess]:
    """A second agent serving a queue whose policy keeps task logs local; drained, resumed, revoked here."""
    airflow_cli(stack, "edge-agents", "queue", "set", LOCAL_QUEUE, "--logs", "local")
    try:
        agent = stack.start_agent(UI_AGENT, [LOCAL_QUEUE], REGION, concurrency=2, extra_env={MARKER_ENV: UI_AGENT})
    except StackError as exc:
        pytest.fail(f"agent {UI_AGENT} did not start:\n{exc}", pytrace=False)
    yield agent
    agent.stop()


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    message = "Debian's chromium is not installed: run scripts/install-test-deps.sh"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_path()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Chromium refuses to start its sandbox as root (containers, CI); the pages are our own.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=args)
        try:
            yield browser
        finally:
            browser.close()


class Screen:
    """One browser page; every failure carries a fresh screenshot's path and the page's text."""

    def __init__(self, page: Any, shots: Path, stack: LocalStack, console: list[str]) -> None:
        self.page = page
        self.shots = shots
        self.stack = stack
        self.console = console
        self.count = 0

    def shot(self, name: str) -> Path:
        self.count += 1
        path = self.shots / f"{self.count:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def fail(self, message: str, name: str = "failure") -> None:
        try:
            where = f"screenshot: {self.shot(name)}"
            text = self.page.inner_text("body")[-3000:]
        except Exception as exc:  # the page itself may be what broke
            where, text = f"(no screenshot: {exc})", ""
        console = "\n".join(self.console[-20:])
        pytest.fail(
            f"{message}\n{where}\n--- page text ---\n{text}\n--- browser console ---\n{console}\n"
            f"{self.stack.log_tails(30)}",
            pytrace=False,
        )

    def expect_text(self, selector: str, expected: str, name: str, timeout_ms: int = UI_TIMEOUT_MS) -> None:
        """Wait until ``selector`` contains ``expected`` (Playwright's own polling), then screenshot."""
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import expect

        try:
            expect(self.page.locator(selector).first).to_contain_text(expected, timeout=timeout_ms)
        except (AssertionError, PlaywrightError) as exc:
            self.fail(f"{selector!r} never showed {expected!r}: {str(exc).splitlines()[0]}", name)
        self.shot(name)


@pytest.fixture()
def screen(browser: Any, stack: LocalStack, tmp_path: Path) -> Iterator[Screen]:
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    try:
        yield Screen(page, tmp_path, stack, console)
    finally:
        context.close()


def row(agent: AgentProcess) -> str:
    return f'#agents tr[data-agent-id="{agent.agent_id}"]'


def rest_agent(stack: LocalStack, agent: AgentProcess) -> dict[str, Any]:
    reply = stack.api.get(f"{API}/agents/{agent.agent_id}")
    assert reply.status_code == 200, reply.text
    return reply.json()


def wait_for(what: str, check, timeout: float, context=lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    pause = 0.5
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{context()}", pytrace=False)
        time.sleep(pause)
        pause = min(pause * 2, 3.0)


@contextlib.contextmanager
def resumed_afterwards(stack: LocalStack, agent: AgentProcess) -> Iterator[None]:
    """Whatever happens in the block, the agent is active again after it (other tests need it)."""
    try:
        yield
    finally:
        stack.api.post(f"{API}/agents/{agent.agent_id}/resume")


# -------------------------------------------------------------------------------------------------
# Authentication: a second api-server with real users (the session stack's is all-admins)
# -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def strict_api_server(stack: LocalStack, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    passwords = {"ops_admin": secrets.token_urlsafe(16), "watcher": secrets.token_urlsafe(16)}
    password_file = tmp_path / "simple-auth-passwords.json"
    write_private(password_file, json.dumps(passwords))
    env = {
        **stack.env,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "ops_admin:admin,watcher:viewer",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(password_file),
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": url,
    }
    log_path = tmp_path / "strict-api-server.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [str(_BIN / "airflow"), "api-server", "--host", "127.0.0.1", "--port", str(port), "--apps", "core"],
            env=env, cwd=stack.home, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"strict api-server exited {proc.returncode}:\n{tail(log_path, 60)}", pytrace=False)
            try:
                return httpx.get(f"{url}{PAGE}", timeout=10).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for("the strict api-server", ready, 300, lambda: tail(log_path, 60))
        yield url, passwords
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def login(url: str, username: str, password: str) -> str:
    reply = httpx.post(f"{url}/auth/token", json={"username": username, "password": password}, timeout=60)
    assert reply.status_code == 201, reply.text
    return str(reply.json()["access_token"])


def test_rest_api_uses_airflows_authentication(stack, ui_agent, screen, tmp_path):
    agent_id = ui_agent.agent_id
    # The session stack (all-admins) still validates a token that is presented: a forged one is refused.
    forged = httpx.get(f"{stack.api_url}{API}/agents", headers={"Authorization": "Bearer forged"}, timeout=30)
    assert forged.status_code == 403 and forged.json() == {"detail": "Invalid JWT token"}, forged.text
    with strict_api_server(stack, tmp_path) as (url, passwords):
        with httpx.Client(base_url=url, timeout=60) as anonymous:
            for method, path in (("GET", f"{API}/agents"), ("GET", f"{API}/explain?dag_id=d&task_id=t&run_id=r"),
                                 ("POST", f"{API}/agents/{agent_id}/drain")):
                reply = anonymous.request(method, path)
                assert reply.status_code == 401 and reply.json() == {"detail": "Not authenticated"}, (path, reply.text)
            # The same answer as Airflow's own API gives.
            assert anonymous.get("/api/v2/dags").status_code == 401
        watcher = login(url, "watcher", passwords["watcher"])
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {watcher}"}) as viewer:
            listed = viewer.get(f"{API}/agents")
            assert listed.status_code == 200, listed.text
            assert agent_id in {a["id"] for a in listed.json()["agents"]} and listed.json()["can_manage"] is False
            refused = viewer.post(f"{API}/agents/{agent_id}/drain")
            assert refused.status_code == 403 and "Op or Admin" in refused.json()["detail"], refused.text
        assert rest_agent(stack, ui_agent)["state"] == "active"
        admin = login(url, "ops_admin", passwords["ops_admin"])
        with resumed_afterwards(stack, ui_agent), \
                httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {admin}"}) as ops:
            assert ops.get(f"{API}/me").json() == {"user": "ops_admin", "can_manage": True}
            drained = ops.post(f"{API}/agents/{agent_id}/drain")
            assert drained.status_code == 200 and drained.json()["agent"]["state"] == "draining", drained.text
            resumed = ops.post(f"{API}/agents/{agent_id}/resume")
            assert resumed.status_code == 200 and resumed.json()["agent"]["state"] == "active", resumed.text

        # The page as the viewer (Airflow's UI cookie): the agents, and no buttons to press.
        screen.page.context.add_cookies([{"name": "_token", "value": watcher, "url": url}])
        screen.page.goto(f"{url}{PAGE}")
        screen.expect_text(f'#agents tr[data-agent-id="{agent_id}"] .agent-name', UI_AGENT, "viewer-page")
        screen.expect_text("#user", "signed in as watcher", "viewer-user")
        if screen.page.locator("button[data-action]").count() != 0:
            screen.fail("a viewer's page offers drain/resume/revoke buttons", "viewer-buttons")


# -------------------------------------------------------------------------------------------------
# The page: list, drain, resume
# -------------------------------------------------------------------------------------------------


def test_page_lists_agents_and_drains_and_resumes(stack, agent, ui_agent, screen):
    screen.page.goto(f"{stack.api_url}{PAGE}")
    screen.expect_text(f"{row(ui_agent)} .agent-name", UI_AGENT, "agents-listed")
    checks = [
        (f"{row(ui_agent)} .agent-queues", LOCAL_QUEUE),
        (f"{row(ui_agent)} .agent-region", REGION),
        (f"{row(ui_agent)} .agent-status", "online"),
        (f"{row(ui_agent)} .agent-slots", "/ 2"),
        (f"{row(agent)} .agent-name", agent.name),
        (f"{row(agent)} .agent-queues", "default"),
        (f"{row(agent)} .agent-status", "online"),
        ('#queues tr[data-queue="e2e_local_logs"]', "local"),
        ("#user", "may drain, resume, revoke"),
    ]
    for selector, text in checks:
        screen.expect_text(selector, text, "agents-page")
    log_before = len(ui_agent.log_path.read_text(errors="replace"))
    with resumed_afterwards(stack, ui_agent):
        screen.page.click(f'{row(ui_agent)} button[data-action="drain"]')
        screen.expect_text(f"{row(ui_agent)} .agent-status", "draining", "after-drain")
        screen.expect_text("#message", f"agent {UI_AGENT} is draining", "after-drain-message")
        assert rest_agent(stack, ui_agent)["state"] == "draining"
        # The agent hears it in its next heartbeat reply.
        wait_for(
            "the agent to log the drain", lambda: "asked this agent to drain" in ui_agent.log_path.read_text(
                errors="replace")[log_before:], 90, lambda: tail(ui_agent.log_path, 30),
        )
        screen.page.click(f'{row(ui_agent)} button[data-action="resume"]')
        screen.expect_text(f"{row(ui_agent)} .agent-status", "online", "after-resume")
        assert rest_agent(stack, ui_agent)["state"] == "active"
    # Auto-refresh: a drain made elsewhere (the CLI) shows up without touching the page.
    with resumed_afterwards(stack, ui_agent):
        airflow_cli(stack, "edge-agents", "drain", ui_agent.agent_id)
        screen.expect_text(f"{row(ui_agent)} .agent-status", "draining", "auto-refreshed", timeout_ms=45_000)


# -------------------------------------------------------------------------------------------------
# Explain
# -------------------------------------------------------------------------------------------------


def test_explain_a_task_on_an_unserved_queue(e2e, ui_agent, screen):
    stack = e2e.stack
    run_id = stack.trigger(DAG_UNSERVED)
    try:
        try:
            stack.wait_ti_state(DAG_UNSERVED, run_id, "stranded", ("queued",), timeout=180)
        except StackError as exc:
            e2e.fail(f"stranded never got queued: {exc}", DAG_UNSERVED, run_id)
        params = {"dag_id": DAG_UNSERVED, "task_id": "stranded", "run_id": run_id}
        reply = stack.api.get(f"{API}/explain", params=params)
        e2e.check(reply.status_code == 200, f"explain: {reply.status_code} {reply.text}", DAG_UNSERVED, run_id)
        data = reply.json()
        e2e.check(
            data["summary"] == "no agent can take it: no agent is granted queue 'e2e_nobody_serves_this'",
            f"summary: {data['summary']}", DAG_UNSERVED, run_id,
        )
        verdicts = {v["agent_id"]: v for v in data["agents"]}
        for agent in (e2e.agent, ui_agent):
            codes = [r["code"] for r in verdicts[agent.agent_id]["reasons"]]
            e2e.check(codes == ["queue_not_served"], f"{agent.name}: {codes}", DAG_UNSERVED, run_id)
        e2e.check(data["job"]["state"] == "queued", f"job: {data['job']}", DAG_UNSERVED, run_id)

        screen.page.goto(f"{stack.api_url}{PAGE}")
        form = screen.page.locator("#explain-form")
        form.locator('input[name="dag_id"]').fill(DAG_UNSERVED)
        form.locator('input[name="task_id"]').fill("stranded")
        form.locator('input[name="run_id"]').fill(run_id)
        form.locator('button[type="submit"]').click()
        screen.expect_text("#explain-result .summary", "no agent is granted queue 'e2e_nobody_serves_this'",
                           "explain-summary")
        screen.expect_text(f'#explain-agents tr[data-agent-id="{e2e.agent.agent_id}"] .reason-queue_not_served',
                           "queue 'e2e_nobody_serves_this' is not granted to it (its queues: default)", "explain-reason")
        screen.expect_text("#explain-result .job-status", "queued since", "explain-job")

        # The tab Airflow shows on the task instance (external view with destination task_instance).
        screen.page.goto(f"{stack.api_url}{PAGE}?view=explain&dag_id={DAG_UNSERVED}&run_id={quote(run_id)}"
                         "&task_id=stranded&map_index=-1")
        screen.expect_text("#explain-result .summary", "no agent is granted queue", "explain-tab")
        if screen.page.locator("#agents-section").is_visible():
            screen.fail("the embedded explain view also shows the agent list", "explain-tab-layout")
    finally:
        stack.set_run_state(DAG_UNSERVED, run_id, "failed")


# -------------------------------------------------------------------------------------------------
# Task logs in the UI: shipped while running, and where they are for a logs = local queue
# -------------------------------------------------------------------------------------------------


def test_task_logs_in_the_ui_while_running_and_after(e2e, ui_agent, screen, tmp_path):
    stack = e2e.stack
    release = tmp_path / "release"
    run_id = stack.trigger(DAG_LOGS, {"release": str(release)})
    try:
        for task_id in ("hosted_logs", "local_logs"):
            try:
                stack.wait_ti_state(DAG_LOGS, run_id, task_id, ("running",), timeout=240)
            except StackError as exc:
                e2e.fail(f"{task_id} never ran: {exc}", DAG_LOGS, run_id)

        # Shipped chunks: the running task's log through Airflow's REST API.
        running_text = e2e.log(DAG_LOGS, run_id, e2e.ti(DAG_LOGS, run_id, "hosted_logs"), "operator-ui: hosted log line")
        still = e2e.ti(DAG_LOGS, run_id, "hosted_logs")
        e2e.check(still.state == "running", f"hosted_logs is {still.state}: the log was not read while running",
                  DAG_LOGS, run_id)
        e2e.check("operator-ui: hosted task released" not in running_text, "read after the release?", DAG_LOGS, run_id)

        # logs = local: the notice says where the log is; the task's own lines never arrive.
        try:
            local_running = stack.wait_log(DAG_LOGS, run_id, "local_logs", 1, NOTICE, timeout=45)
        except StackError as exc:
            e2e.fail(f"no local-logs notice in the running task's log:\n{exc}", DAG_LOGS, run_id)
        e2e.check(f"edge agent {UI_AGENT} ({ui_agent.agent_id})" in local_running and "attempt=1.log" in local_running,
                  f"notice lacks agent or path:\n{local_running[-2000:]}", DAG_LOGS, run_id)
        local_now = stack.task_log(DAG_LOGS, run_id, "local_logs", 1)
        e2e.check("operator-ui: local log line" not in local_now, "a logs=local task's line reached the hosted side",
                  DAG_LOGS, run_id)
    finally:
        release.touch()
    try:
        state = stack.wait_run(DAG_LOGS, run_id, timeout=240)
    except StackError as exc:
        e2e.fail(f"run did not finish after the release: {exc}", DAG_LOGS, run_id)
    e2e.check(state == "success", f"run ended {state}", DAG_LOGS, run_id)

    hosted = e2e.ti(DAG_LOGS, run_id, "hosted_logs")
    e2e.assert_on_agent(DAG_LOGS, run_id, hosted, "operator-ui: hosted task released")
    after = stack.task_log(DAG_LOGS, run_id, "local_logs", 1)
    e2e.check("operator-ui: local log line" not in after, "the local log reached the hosted side", DAG_LOGS, run_id)
    kept = [p for p in (ui_agent.state_dir / "logs").rglob("attempt=1.log")
            if "task_id=local_logs" in str(p) and f"run_id={run_id}" in str(p)]
    e2e.check(kept and "operator-ui: local log line" in kept[0].read_text(errors="replace"),
              f"the agent's own log folder lacks the task's log: {kept}", DAG_LOGS, run_id)
    e2e.check(NOTICE in after and UI_AGENT in after, f"no notice after the run:\n{after[-2000:]}", DAG_LOGS, run_id)
    rel = kept[0].relative_to(ui_agent.state_dir / "logs")
    e2e.check(str(rel) in after, f"the notice does not name {rel}:\n{after[-2000:]}", DAG_LOGS, run_id)

    # Airflow's own task log view, rendered in Chromium.
    base = f"{stack.api_url}/dags/{DAG_LOGS}/runs/{quote(run_id, safe='')}/tasks"
    screen.page.goto(f"{base}/hosted_logs")
    screen.expect_text("body", "operator-ui: hosted log line", "airflow-log-hosted", timeout_ms=90_000)
    screen.page.goto(f"{base}/local_logs")
    screen.expect_text("body", NOTICE, "airflow-log-local", timeout_ms=90_000)
    screen.expect_text("body", f"edge agent {UI_AGENT}", "airflow-log-local-agent")


# -------------------------------------------------------------------------------------------------
# Revoke (last: the agent cannot come back)
# -------------------------------------------------------------------------------------------------


def test_revoke_inside_airflows_ui_after_confirming(stack, ui_agent, screen):
    """The page as Airflow's navigation shows it (Admin > Edge agents: a sandboxed iframe), revoke included."""
    import re

    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect

    log_before = len(ui_agent.log_path.read_text(errors="replace"))
    page = screen.page
    page.goto(f"{stack.api_url}/")
    try:
        # Airflow's navigation: Admin > Edge agents opens the page inside Airflow's UI.
        page.get_by_role("button", name="Admin").click(timeout=90_000)
        page.get_by_text("Edge agents", exact=True).first.click(timeout=UI_TIMEOUT_MS)
        expect(page).to_have_url(re.compile(r"/plugin/edge-agents\b"), timeout=UI_TIMEOUT_MS)
        expect(page.locator("iframe").first).to_have_attribute("src", re.compile(r"/edge-agents/"))
    except (AssertionError, PlaywrightError) as exc:
        screen.fail(f"Admin > Edge agents in Airflow's navigation: {str(exc).splitlines()[0]}", "airflow-nav")
    screen.shot("airflow-nav")
    frame = page.frame_locator("iframe")
    status = frame.locator(f"{row(ui_agent)} .agent-status")
    try:
        expect(status).to_contain_text("online", timeout=90_000)
        revoke = frame.locator(f'{row(ui_agent)} button[data-action="revoke"]')
        revoke.click()
        expect(revoke).to_have_text("Confirm revoke", timeout=UI_TIMEOUT_MS)
        expect(frame.locator("#message")).to_contain_text("can never connect again", timeout=UI_TIMEOUT_MS)
        assert rest_agent(stack, ui_agent)["state"] == "active", "one click must not revoke"
        revoke.click()
        expect(status).to_contain_text("revoked", timeout=UI_TIMEOUT_MS)
        expect(frame.locator(f"{row(ui_agent)} button[data-action]")).to_have_count(0, timeout=UI_TIMEOUT_MS)
    except (AssertionError, PlaywrightError) as exc:
        screen.fail(f"revoke inside Airflow's UI: {str(exc).splitlines()[0]}", "airflow-revoke")
    screen.shot("airflow-after-revoke")
    assert rest_agent(stack, ui_agent)["state"] == "revoked"
    # Its next call is refused; the agent notices (it must register again).
    wait_for(
        "the revoked agent to be refused",
        lambda: "revoked" in ui_agent.log_path.read_text(errors="replace")[log_before:],
        90, lambda: tail(ui_agent.log_path, 30),
    )
