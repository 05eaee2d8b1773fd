"""``create_app(settings)``: the gateway's ASGI app.

* ``/agents/v1/...``: our agent API (routers in :mod:`executor_plugin.gateway.routes`).
* ``/execution/...``: Airflow's own Execution API, mounted in-process behind
  :class:`~executor_plugin.gateway.auth.RequireAgentCertificate`, so a task's supervisor reaches
  it through its agent's mTLS connection and nothing else can.

The root lifespan enters the Execution API's lifespan (its svcs registry holds the JWT validator
and generator; without it every authenticated call fails) and closes the lease notifier.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from executor_plugin import store
from executor_plugin.gateway.auth import RequireAgentCertificate
from executor_plugin.gateway.notify import LeaseNotifier, QueueSet
from executor_plugin.gateway.routes import GatewayState, build_router
from executor_plugin.gateway.routes.lease import workload_token_generator
from executor_plugin.pki import CertificateAuthority
from executor_plugin.settings import HostedSettings

log = logging.getLogger(__name__)

EXECUTION_MOUNT = "/execution"


def _queue_sets_with_work(queue_sets: list[QueueSet]) -> list[QueueSet]:
    from airflow.utils.session import create_session

    with create_session() as session:
        return [queues for queues in queue_sets if store.queued_exists(session, queues)]


def _execution_api() -> FastAPI:
    from airflow.api_fastapi.common.dagbag import create_dag_bag
    from airflow.api_fastapi.execution_api.app import create_task_execution_api_app

    app = create_task_execution_api_app()
    # As airflow.api_fastapi.app.create_app does: routes such as /run resolve DAGs through it.
    app.state.dag_bag = create_dag_bag()
    return app


async def _warm_execution_api(execution_api: FastAPI) -> None:
    """Serve one in-process request before accepting agents.

    Airflow's Execution API initialises lazily on its first request (3.8 s measured here, 5-12 s
    in the notes), which is longer than the Task SDK's default timeout: without this the first
    task after a gateway start pays it, or times out and retries its ``/run``.
    """
    import time

    import httpx

    started = time.monotonic()
    transport = httpx.ASGITransport(app=execution_api)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.invalid") as client:
        response = await client.get("/health")
    log.info(
        "execution API warmed in %.1f s (health %s)", time.monotonic() - started, response.status_code
    )


def create_app(settings: HostedSettings, *, ca: CertificateAuthority | None = None) -> FastAPI:
    """Build the gateway app. Fails at once if the CA or the JWT signing key is missing."""
    ca = ca or CertificateAuthority.load(settings.ca_dir)
    state = GatewayState(
        settings=settings,
        ca=ca,
        notifier=LeaseNotifier(_queue_sets_with_work, settings.lease_poll_interval),
        jwt_generator=workload_token_generator(),
    )
    execution_api = _execution_api()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(execution_api.router.lifespan_context(execution_api))
            stack.push_async_callback(state.notifier.aclose)
            await _warm_execution_api(execution_api)
            yield

    app = FastAPI(
        title="edge-agent gateway",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.gateway = state
    app.include_router(build_router())
    app.mount(EXECUTION_MOUNT, RequireAgentCertificate(execution_api, settings.trust_domain))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    return app


__all__ = ["EXECUTION_MOUNT", "create_app"]
