"""One PostgreSQL ``LISTEN`` connection per gateway process, turning the enqueue notifications of
:mod:`executor_plugin.gateway.job_channel` into calls of ``on_queue(queue)`` on the event loop.

The connection is psycopg 3's async one, on the gateway's own loop (no thread), opened with the
parameters of Airflow's engine, in autocommit (a ``LISTEN`` inside an open transaction would hear
nothing until it ended). It is a connection of its own, outside the engine's pool: it is held for
the process's life.

``on_listening(True)`` is called once ``LISTEN`` is in effect, ``on_listening(False)`` when the
connection is lost. Notifications sent while nobody listened are lost, so the notifier checks the
table on every ``True`` and polls at its full rate while down. A lost connection is reopened with
exponential backoff (:data:`BACKOFF_FIRST_SECONDS` to :data:`BACKOFF_MAX_SECONDS`); a connection
that dies silently (no reset from the network) is noticed by TCP keepalives and by a ``SELECT 1``
after :data:`IDLE_CHECK_SECONDS` without a notification. Failures are logged once per outage,
without the password.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from executor_plugin.gateway.job_channel import CHANNEL

log = logging.getLogger(__name__)

BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0
IDLE_CHECK_SECONDS = 30.0
#: How the connection shows in ``pg_stat_activity``.
APPLICATION_NAME = "edge-agent gateway listener"
#: libpq keepalives: a peer gone without a reset is noticed in about 25 s instead of TCP's minutes.
_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
#: A server that does not answer at all must not hold the reconnect loop for TCP's minutes either.
_CONNECT_TIMEOUT_SECONDS = 10


class QueueListener:
    """Listens on :data:`~executor_plugin.gateway.job_channel.CHANNEL` until :meth:`aclose`."""

    def __init__(
        self,
        connect_kwargs: Mapping[str, Any],
        on_queue: Callable[[str], None],
        on_listening: Callable[[bool], None],
        *,
        where: str = "PostgreSQL",
    ) -> None:
        self._connect_kwargs = {
            **_KEEPALIVES,
            "connect_timeout": _CONNECT_TIMEOUT_SECONDS,
            "application_name": APPLICATION_NAME,
            **connect_kwargs,
        }
        self._on_queue = on_queue
        self._on_listening = on_listening
        #: Names the server in logs (never with the password).
        self._where = where
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start listening (on the running loop). Idempotent."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="edge-agent-pg-listen")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        import psycopg

        backoff = BACKOFF_FIRST_SECONDS
        failing = False
        while True:
            listening = False
            try:
                conn = await psycopg.AsyncConnection.connect(autocommit=True, **self._connect_kwargs)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    listening = True
                    if failing:
                        log.info("listening for queued jobs on %s again", self._where)
                    else:
                        log.info("listening for queued jobs on %s (channel %s)", self._where, CHANNEL)
                    failing = False
                    backoff = BACKOFF_FIRST_SECONDS
                    self._on_listening(True)
                    while True:
                        async for note in conn.notifies(timeout=IDLE_CHECK_SECONDS):
                            self._on_queue(note.payload)
                        await conn.execute("SELECT 1")  # a quiet spell: is the connection alive?
            except (psycopg.Error, OSError) as exc:
                if not failing:
                    # str(exc) from libpq names host and port, never the password.
                    log.warning(
                        "lost the PostgreSQL listen connection to %s (%s); lease wake-ups fall back to "
                        "polling, reconnecting", self._where, str(exc).strip() or type(exc).__name__,
                    )
                failing = True
            except Exception:
                # A bug here must not end listening for the process's life: log it, reconnect.
                log.exception("the PostgreSQL listener failed; reconnecting")
                failing = True
            finally:
                if listening:
                    self._on_listening(False)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_SECONDS)


def connect_kwargs_for(url: Any) -> dict[str, Any]:
    """psycopg 3 connection arguments for a SQLAlchemy PostgreSQL URL, whatever its driver."""
    from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

    _, kwargs = PGDialect_psycopg().create_connect_args(url.set(drivername="postgresql+psycopg"))
    kwargs.pop("context", None)  # SQLAlchemy's type adapters: nothing to adapt on this connection
    return kwargs


def for_airflow_engine(on_queue: Callable[[str], None], on_listening: Callable[[bool], None]) -> QueueListener | None:
    """A listener on the database of Airflow's engine, or None when it is not PostgreSQL or psycopg 3
    is missing (the notifier then polls)."""
    from airflow import settings

    engine = settings.engine
    if engine is None or engine.dialect.name != "postgresql":
        return None
    try:
        import psycopg  # noqa: F401
    except ImportError:
        log.warning("psycopg 3 is not installed: lease wake-ups poll PostgreSQL instead of listening")
        return None
    where = engine.url.render_as_string(hide_password=True)
    return QueueListener(connect_kwargs_for(engine.url), on_queue, on_listening, where=where)


__all__ = [
    "APPLICATION_NAME",
    "BACKOFF_FIRST_SECONDS",
    "BACKOFF_MAX_SECONDS",
    "IDLE_CHECK_SECONDS",
    "QueueListener",
    "connect_kwargs_for",
    "for_airflow_engine",
]
