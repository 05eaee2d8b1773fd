"""``create_app(settings)``: the gateway's ASGI app.

* ``/agents/v1/...``: our agent API (routers in :mod:`executor_plugin.gateway.routes`).
* ``/execution/...``: Airflow's own Execution API, mounted in-process behind
  :class:`~executor_plugin.gateway.auth.RequireAgentCertificate`, so a task's supervisor reaches
  it through its agent's mTLS connection and nothing else can.

The root lifespan enters the Execution API's lifespan (its svcs registry holds the JWT validator
and generator; without it every authenticated call fails), watches the CA directory for a rotation
(:mod:`executor_plugin.gateway.ca_watch`) and closes the lease notifier.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from executor_plugin.gateway.auth import RequireAgentCertificate
from executor_plugin.gateway.ca_watch import CA_CHECK_SECONDS, LiveCA
from executor_plugin.gateway.notify import LeaseNotifier
from executor_plugin.gateway.routes import GatewayState, build_router
from executor_plugin.gateway.routes.lease import workload_token_generator
from executor_plugin.pki import CertificateAuthority
from executor_plugin.settings import HostedSettings

log = logging.getLogger(__name__)

EXECUTION_MOUNT = "/execution"


async def _watch_ca(live_ca: LiveCA) -> None:
    """Follow ``ca rotate`` / ``ca retire-old`` made by another process (see ca_watch)."""
    failing = False
    while True:
        await asyncio.sleep(CA_CHECK_SECONDS)
        try:
            changed = await asyncio.to_thread(live_ca.refresh)
        except Exception:
            if not failing:
                log.exception("cannot reload the edge-agent CA; still using the one loaded before")
            failing = True
            continue
        failing = False
        if changed:
            await live_ca.notify()


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


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(settings: HostedSettings, *, ca: CertificateAuthority | None = None) -> FastAPI:
    """Build the gateway app. Fails at once if the CA or the JWT signing key is missing."""
    ca = ca or CertificateAuthority.load(settings.ca_dir)
    state = GatewayState(
        settings=settings,
        live_ca=LiveCA(ca),
        notifier=LeaseNotifier(poll_interval=settings.lease_poll_interval),
        jwt_generator=workload_token_generator(),
    )
    execution_api = _execution_api()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(execution_api.router.lifespan_context(execution_api))
            stack.push_async_callback(state.notifier.aclose)
            watcher = asyncio.get_running_loop().create_task(_watch_ca(state.live_ca), name="edge-agent-ca-watch")
            stack.push_async_callback(_cancel, watcher)
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
    app.mount(EXECUTION_MOUNT, RequireAgentCertificate(execution_api, state))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes each bad input back: a NaN or Infinity there cannot be encoded
        # (a 500 instead of a 422), and a registration token sent in a malformed body would be
        # reflected. Say where and what, never the value.
        errors = [
            {
                "loc": [str(part) for part in error.get("loc", ())],
                "msg": str(error.get("msg", "")),
                "type": str(error.get("type", "")),
            }
            for error in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    return app


__all__ = ["EXECUTION_MOUNT", "create_app"]
