"""``create_app()``: the Edge agents page and its REST API, mounted by the plugin in the api-server.

Layout under the mount prefix (``/edge-agents``):

* ``/`` the page (``static/index.html``: plain HTML, one small script, no build step);
* ``/static/...`` its script and style sheet (package data);
* ``/api/v1/...`` the REST API (:mod:`executor_plugin.ui.api`), behind Airflow's authentication.

Nothing is read at construction: the ``[core] executor`` list and the offline window come from
Airflow's config at the first request that needs them (:class:`UIConfig`). The page is served to
anyone (it holds no data); its script fetches everything through the authenticated API.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import SQLAlchemyError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
API_PREFIX = "/api/v1"

#: Sent with the page and its files: no inline script, no foreign origin, framed only by Airflow's UI
#: (same origin: it shows the page in an iframe). Agent names are untrusted input; the script only
#: ever sets them as text, and this policy stops any script that would slip through.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'self'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

SessionFactory = Callable[[], AbstractContextManager["Session"]]


@dataclass(frozen=True)
class UIConfig:
    #: ``[core] executor``: decides whether a task instance runs on edge agents.
    executors: str
    #: An agent with no heartbeat for longer than this is offline.
    dead_after: timedelta

    @classmethod
    def from_airflow_conf(cls) -> "UIConfig":
        from airflow.configuration import conf

        from executor_plugin.settings import agent_dead_after_from_conf

        return cls(executors=conf.get("core", "executor"), dead_after=agent_dead_after_from_conf())


class UIContext:
    """What the routes share (kept on ``app.state.edge_agents``): sessions and the lazily read config."""

    def __init__(self, sessions: SessionFactory, config: UIConfig | None) -> None:
        self.sessions = sessions
        self._config = config

    def config(self) -> UIConfig:
        if self._config is None:
            self._config = UIConfig.from_airflow_conf()
        return self._config


def airflow_sessions() -> AbstractContextManager[Session]:
    """A session of Airflow's metadata database, committed on success and rolled back on error."""
    from airflow.utils.session import create_session

    return create_session(scoped=False)


def _detail(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("query", "path", "body"))
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg", "invalid")))
    return "invalid request: " + "; ".join(parts)


def create_app(*, sessions: SessionFactory | None = None, config: UIConfig | None = None) -> FastAPI:
    """The sub-app; ``sessions`` and ``config`` default to Airflow's database and config (tests pass theirs)."""
    from executor_plugin.ui.api import router

    app = FastAPI(title="Edge agents", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.edge_agents = UIContext(sessions or airflow_sessions, config)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _detail(exc)}, status_code=422)

    @app.exception_handler(SQLAlchemyError)
    async def _database(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        # The traceback goes to the api-server log; the caller gets one line, no SQL text.
        log.exception("edge-agents API: database error on %s", request.url.path)
        return JSONResponse(
            {"detail": "database error: the metadata database is unreachable or the edge-agent tables are "
             "missing (run 'airflow db migrate')"},
            status_code=503,
        )

    @app.middleware("http")
    async def _headers(request: Request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        # Agent state changes by the second: a cached list or script version would mislead.
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="edge_agents_static")
    app.include_router(router, prefix=API_PREFIX)

    @app.api_route(f"{API_PREFIX}/{{rest:path}}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                   include_in_schema=False)
    def _unknown(rest: str) -> JSONResponse:
        return JSONResponse({"detail": f"no such endpoint: {API_PREFIX}/{rest}"}, status_code=404)

    return app


__all__ = ["API_PREFIX", "SECURITY_HEADERS", "UIConfig", "UIContext", "airflow_sessions", "create_app"]
