"""The Edge agents REST API and page behind Airflow's real authentication.

A real uvicorn server on 127.0.0.1 serves a root app with the plugin's sub-app mounted at
``/edge-agents`` (as the api-server mounts it), with Airflow's SimpleAuthManager (users admin, op,
user, viewer; not all-admins) and real JWTs signed with the configured secret. Airflow's session
factories point at a temp SQLite file holding our tables plus the Airflow tables the routes touch
(task_instance, log, revoked_token); rows are written through the real store.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest

# Sets AIRFLOW_HOME before Airflow is imported, and provides the row builders (tests/unit is on sys.path).
from test_explain import OURS, add_task_instance, enqueue, register  # noqa: I001

import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from sqlalchemy import create_engine, select  # noqa: E402
from sqlalchemy.orm import scoped_session, sessionmaker  # noqa: E402

from airflow import settings  # noqa: E402

from executor_plugin import store  # noqa: E402
from executor_plugin.models import metadata  # noqa: E402
from executor_plugin.ui.app import SECURITY_HEADERS, UIConfig, create_app  # noqa: E402

PREFIX = "/edge-agents"
USERS = "admin:admin,op:op,user:user,viewer:viewer"
WINDOW = timedelta(seconds=30)


class Server:
    """The root app on a real uvicorn in a thread, plus clients per role."""

    def __init__(self, url: str, auth_manager, sessions: sessionmaker) -> None:
        self.url = url
        self.auth_manager = auth_manager
        self.sessions = sessions

    def token(self, role: str, **kwargs) -> str:
        from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

        return self.auth_manager.generate_jwt(SimpleAuthManagerUser(username=role, role=role), **kwargs)

    def client(self, role: str | None = None, *, headers: dict[str, str] | None = None, **kwargs) -> httpx.Client:
        auth = {"Authorization": f"Bearer {self.token(role)}"} if role else {}
        return httpx.Client(base_url=f"{self.url}{PREFIX}", headers={**auth, **(headers or {})}, timeout=30, **kwargs)


def _serve(app: FastAPI) -> tuple[str, uvicorn.Server, threading.Thread]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)  # connections wait in the backlog until uvicorn accepts: no readiness race
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    from airflow.api_fastapi import app as airflow_app
    from airflow.models import import_all_models
    from airflow.models.log import Log
    from airflow.models.revoked_token import RevokedToken
    from airflow.models.taskinstance import TaskInstance

    import_all_models()
    path = tmp_path_factory.mktemp("ui") / "airflow.db"
    engine = create_engine(f"sqlite:///{path}", connect_args={"check_same_thread": False})
    metadata.create_all(engine)
    for table in (TaskInstance.__table__, Log.__table__, RevokedToken.__table__):
        table.create(engine)
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(settings, "engine", engine)
        mp.setattr(settings, "NonScopedSession", factory)
        mp.setattr(settings, "Session", scoped_session(factory))
        mp.setenv(
            "AIRFLOW__CORE__AUTH_MANAGER",
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        )
        mp.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", USERS)
        mp.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")
        mp.setenv("AIRFLOW__API_AUTH__JWT_SECRET", "unit-test-secret-" + "x" * 64)
        previous = airflow_app._AuthManagerState.instance
        airflow_app._AuthManagerState.instance = None
        auth_manager = airflow_app.create_auth_manager()
        root = FastAPI()
        root.state.auth_manager = auth_manager
        # Default session factory (Airflow's create_session), as in the api-server; config given.
        root.mount(PREFIX, create_app(config=UIConfig(executors=OURS, dead_after=WINDOW)))
        url, uv, thread = _serve(root)
        try:
            yield Server(url, auth_manager, factory)
        finally:
            uv.should_exit = True
            thread.join(30)
            airflow_app._AuthManagerState.instance = previous
            settings.Session.remove()
            engine.dispose()
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def fleet(server) -> dict[str, store.Agent]:
    """Agents on queue ui_q (one busy, one draining, one silent) and a queued job there."""
    s = server.sessions()
    agents = {
        "ui-ready": register(s, "ui-ready", queues=("ui_q",), slots=(3, 4)),
        "ui-busy": register(s, "ui-busy", queues=("ui_q", "ui_other"), slots=(0, 2)),
        "ui-silent": register(s, "ui-silent", queues=("ui_q",), heartbeat=False),
    }
    ti_id = add_task_instance(s, task_id="ui_task", queue="ui_q")
    enqueue(s, ti_id, queue="ui_q", task_id="ui_task")
    s.close()
    return agents


def detail(reply: httpx.Response) -> str:
    assert reply.headers["content-type"].startswith("application/json"), reply.text
    return reply.json()["detail"]


# ---------------------------------------------------------------------------------------------------
# Authentication and authorization
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/v1/agents"), ("GET", "/api/v1/me"), ("GET", "/api/v1/agents/x"),
    ("GET", "/api/v1/explain?dag_id=d&task_id=t&run_id=r"),
    ("POST", "/api/v1/agents/x/drain"), ("POST", "/api/v1/agents/x/resume"), ("POST", "/api/v1/agents/x/revoke"),
])
def test_every_endpoint_needs_a_credential(server, method, path):
    with server.client() as c:
        reply = c.request(method, path)
    assert reply.status_code == 401 and detail(reply) == "Not authenticated"


def test_a_forged_or_expired_token_is_refused(server, fleet):
    with server.client(headers={"Authorization": "Bearer not-a-jwt"}) as c:
        assert c.get("/api/v1/agents").status_code == 403
    expired = server.token("admin", expiration_time_in_seconds=-60)
    with server.client(headers={"Authorization": f"Bearer {expired}"}) as c:
        reply = c.get("/api/v1/agents")
    assert reply.status_code == 401 and detail(reply) == "Token Expired"


def test_the_ui_cookie_authenticates_too(server, fleet):
    with server.client(cookies={"_token": server.token("viewer")}) as c:
        reply = c.get("/api/v1/me")
    assert reply.status_code == 200 and reply.json() == {"user": "viewer", "can_manage": False}


@pytest.mark.parametrize(("role", "can_manage"), [("viewer", False), ("user", False), ("op", True), ("admin", True)])
def test_who_may_manage(server, fleet, role, can_manage):
    with server.client(role) as c:
        assert c.get("/api/v1/me").json()["can_manage"] is can_manage
        assert c.get("/api/v1/agents").json()["can_manage"] is can_manage


def test_a_viewer_reads_but_cannot_drain_resume_or_revoke(server, fleet):
    agent = fleet["ui-ready"]
    with server.client("viewer") as c:
        assert c.get("/api/v1/agents").status_code == 200
        for action in ("drain", "resume", "revoke"):
            reply = c.post(f"/api/v1/agents/{agent.id}/{action}")
            assert reply.status_code == 403 and "write access to the [edge_agent] configuration" in detail(reply)
    with server.sessions() as s:
        assert store.get_agent(s, agent.id).state == "active"


def test_a_cross_origin_post_is_refused_even_for_an_admin(server, fleet):
    with server.client("admin", headers={"Origin": "https://evil.example"}) as c:
        reply = c.post(f"/api/v1/agents/{fleet['ui-ready'].id}/drain")
    assert reply.status_code == 403 and "cross-origin" in detail(reply)
    same = server.url.split("://", 1)[1]
    with server.client("admin", headers={"Origin": f"http://{same}"}) as c:
        assert c.post(f"/api/v1/agents/{fleet['ui-silent'].id}/resume").status_code == 200


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------


def test_agents_list_has_every_field_the_page_shows(server, fleet):
    with server.client("viewer") as c:
        data = c.get("/api/v1/agents").json()
    rows = {row["name"]: row for row in data["agents"]}
    ready, busy, silent = rows["ui-ready"], rows["ui-busy"], rows["ui-silent"]
    assert set(ready) >= {
        "id", "name", "queues", "region", "state", "status", "online", "slots_free", "slots_total", "running_jobs",
        "last_heartbeat", "heartbeat_age_seconds", "version", "cert_not_after", "cert_expires_in_seconds",
    }
    assert ready["queues"] == ["ui_q"] and ready["region"] == "eu-west-1" and ready["version"] == "1.0"
    assert ready["status"] == "online" and ready["slots_free"] == 3 and ready["slots_total"] == 4
    assert busy["queues"] == ["ui_q", "ui_other"] and busy["slots_free"] == 0
    assert silent["status"] == "offline" and silent["last_heartbeat"] is None
    assert data["dead_after_seconds"] == 30.0
    queue = next(q for q in data["queues"] if q["queue"] == "ui_q")
    assert queue["queued"] >= 1 and queue["agents_serving"] == 3
    # Online and active: ui-ready and ui-busy (ui-silent never sent a heartbeat); ui-busy has no slot.
    assert queue["agents_online"] == 2 and queue["free_slots"] == 3
    assert queue["logs"] == "hosted" and queue["regions"] is None and queue["oldest_queued_seconds"] >= 0


def test_one_agent_and_an_unknown_one(server, fleet):
    with server.client("viewer") as c:
        assert c.get(f"/api/v1/agents/{fleet['ui-busy'].id}").json()["name"] == "ui-busy"
        reply = c.get("/api/v1/agents/ag-nope")
    assert reply.status_code == 404 and detail(reply) == "no agent 'ag-nope'"


def test_explain_endpoint(server, fleet):
    with server.client("viewer") as c:
        data = c.get("/api/v1/explain", params={"dag_id": "dag", "task_id": "ui_task", "run_id": "run"}).json()
    verdicts = {v["name"]: v for v in data["agents"]}
    assert verdicts["ui-ready"]["can_take"] is True
    assert [r["code"] for r in verdicts["ui-busy"]["reasons"]] == ["no_free_slots"]
    assert [r["code"] for r in verdicts["ui-silent"]["reasons"]] == ["offline"]
    assert data["queue"] == "ui_q" and data["job"]["state"] == "queued"
    assert data["job_status"].startswith("queued since")


def test_explain_errors_are_clear_json(server, fleet):
    with server.client("viewer") as c:
        missing = c.get("/api/v1/explain", params={"dag_id": "dag", "task_id": "nope", "run_id": "run"})
        invalid = c.get("/api/v1/explain", params={"task_id": "t", "run_id": "r", "map_index": "x"})
        unknown = c.get("/api/v1/nothing-here")
    assert missing.status_code == 404 and detail(missing).startswith("no task instance dag/run/nope")
    assert invalid.status_code == 422
    assert detail(invalid) == "invalid request: dag_id: Field required; map_index: Input should be a valid integer, " \
        "unable to parse string as an integer"
    assert unknown.status_code == 404 and detail(unknown) == "no such endpoint: /api/v1/nothing-here"


# ---------------------------------------------------------------------------------------------------
# Drain, resume, revoke
# ---------------------------------------------------------------------------------------------------


def test_drain_resume_revoke_as_admin_with_audit_log(server):
    from airflow.models.log import Log

    s = server.sessions()
    agent = register(s, "ui-victim", queues=("ui_victim_q",))
    ti_id = add_task_instance(s, task_id="victim_task", queue="ui_victim_q")
    enqueue(s, ti_id, queue="ui_victim_q", task_id="victim_task")
    assert store.lease_next(s, agent, lease_ttl=timedelta(minutes=5)) is not None
    s.close()
    with server.client("admin") as c:
        drained = c.post(f"/api/v1/agents/{agent.id}/drain").json()
        assert drained["agent"]["state"] == "draining" and drained["agent"]["status"] == "draining"
        assert "is draining" in drained["message"]
        resumed = c.post(f"/api/v1/agents/{agent.id}/resume").json()
        assert resumed["agent"]["state"] == "active" and resumed["message"] == "agent ui-victim is active again"
        revoked = c.post(f"/api/v1/agents/{agent.id}/revoke").json()
        assert revoked["agent"]["state"] == "revoked" and revoked["requeued_jobs"] == 1
        assert "1 leased job(s) went back to the queue" in revoked["message"]
        again = c.post(f"/api/v1/agents/{agent.id}/drain")
        assert again.status_code == 409 and "revoked: register a new agent instead" in detail(again)
        unknown = c.post("/api/v1/agents/ag-nope/revoke")
        assert unknown.status_code == 404 and detail(unknown) == "no agent 'ag-nope'"
    with server.sessions() as s:
        rows = s.execute(select(Log.event, Log.owner, Log.extra).where(Log.event.like("edge_agents.%"))).all()
    mine = [(event, owner) for event, owner, extra in rows if json.loads(extra)["agent_id"] == agent.id]
    assert mine == [("edge_agents.drain", "admin"), ("edge_agents.resume", "admin"), ("edge_agents.revoke", "admin")]


# ---------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------


def test_the_page_and_its_files_are_served_with_a_strict_policy(server):
    with server.client() as c:
        page = c.get("/")
        script = c.get("/static/app.js")
        style = c.get("/static/app.css")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>Edge agents</title>" in page.text and 'src="static/app.js"' in page.text
    assert page.headers["content-security-policy"] == SECURITY_HEADERS["Content-Security-Policy"]
    assert "script-src 'self'" in page.headers["content-security-policy"] and "<script>" not in page.text
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "fetch(`api/v1/" in script.text and "innerHTML" not in script.text
    assert style.status_code == 200 and "text/css" in style.headers["content-type"]


def test_a_database_outage_is_a_clear_503(server, tmp_path):
    from contextlib import contextmanager

    broken = create_engine(f"sqlite:///{tmp_path / 'empty.db'}")  # no tables at all

    @contextmanager
    def sessions():
        with sessionmaker(bind=broken)() as session:
            yield session

    root = FastAPI()
    root.state.auth_manager = server.auth_manager
    root.mount(PREFIX, create_app(sessions=sessions, config=UIConfig(executors=OURS, dead_after=WINDOW)))
    url, uv, thread = _serve(root)
    try:
        with httpx.Client(base_url=f"{url}{PREFIX}", headers={"Authorization": f"Bearer {server.token('viewer')}"},
                          timeout=30) as c:
            reply = c.get("/api/v1/agents")
    finally:
        uv.should_exit = True
        thread.join(30)
        broken.dispose()
    assert reply.status_code == 503 and detail(reply).startswith("database error:")


# ---------------------------------------------------------------------------------------------------
# The plugin
# ---------------------------------------------------------------------------------------------------


def test_plugin_builds_nothing_at_import_and_mounts_outside_reserved_prefixes():
    code = (
        "import sys, executor_plugin.plugin as p\n"
        "print('RESULT', 'fastapi' in sys.modules, 'executor_plugin.ui.app' in sys.modules)\n"
        "plugin = p.EdgeAgentsPlugin()\n"
        "[app] = plugin.fastapi_apps\n"
        "print('RESULT', type(app['app']).__name__, app['url_prefix'], plugin.fastapi_apps is plugin.fastapi_apps)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    # Airflow may log to stdout too: only the RESULT lines are ours.
    first, second = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert first == "RESULT False False"
    assert second == "RESULT FastAPI /edge-agents True"
    from airflow.api_fastapi.app import RESERVED_URL_PREFIXES

    assert not any("/edge-agents".startswith(prefix) for prefix in RESERVED_URL_PREFIXES)


def test_plugin_external_views(monkeypatch):
    from executor_plugin.plugin import EdgeAgentsPlugin

    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/airflow/")
    nav, tab = EdgeAgentsPlugin().external_views
    assert nav == {"name": "Edge agents", "href": "/airflow/edge-agents/", "destination": "nav",
                   "category": "admin", "url_route": "edge-agents"}
    assert tab["destination"] == "task_instance" and tab["href"].startswith("/airflow/edge-agents/?view=explain")
    assert "{DAG_ID}" in tab["href"] and "{RUN_ID}" in tab["href"] and "{TASK_ID}" in tab["href"]
