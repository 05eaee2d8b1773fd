"""The agent API (``/agents/v1``): one router per resource, and the state they share.

Every route path comes from :mod:`edge_agent.protocol`. Route modules hold no SQL: they call
:mod:`executor_plugin.store` inside :func:`db` (a worker thread with a committed-or-rolled-back
Airflow session), so the event loop never blocks on the database.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

if TYPE_CHECKING:
    from airflow.api_fastapi.auth.tokens import JWTGenerator

    from executor_plugin.gateway.ca_watch import LiveCA
    from executor_plugin.gateway.notify import LeaseNotifier
    from executor_plugin.pki import CertificateAuthority
    from executor_plugin.settings import HostedSettings

T = TypeVar("T")


@dataclass(frozen=True)
class GatewayState:
    """Everything the routes need, built once by ``create_app`` and kept on ``app.state.gateway``."""

    settings: "HostedSettings"
    #: The CA as on disk now (follows ``ca rotate`` / ``ca retire-old`` within seconds).
    live_ca: "LiveCA"
    notifier: "LeaseNotifier"
    #: Signs the workload tokens handed out with each lease (same as ``BaseExecutor.jwt_generator``).
    jwt_generator: "JWTGenerator"

    @property
    def ca(self) -> "CertificateAuthority":
        return self.live_ca.ca


def gateway_state(request: Request) -> GatewayState:
    return request.app.state.gateway


def _in_session(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    from airflow.utils.session import create_session

    with create_session() as session:
        return fn(session, *args, **kwargs)


async def db(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(session, *args, **kwargs)`` in a worker thread; commit on success, else roll back."""
    return await run_in_threadpool(_in_session, fn, *args, **kwargs)


def build_router() -> APIRouter:
    from executor_plugin.gateway.routes import heartbeat, jobs, lease, lifecycle, register, trust

    router = APIRouter()
    for module in (trust, register, lifecycle, lease, jobs, heartbeat):
        router.include_router(module.router)
    return router


__all__ = ["GatewayState", "build_router", "db", "gateway_state"]
