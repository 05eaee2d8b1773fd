"""Fixtures shared by the unit tests: our tables in a real SQLite file."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from executor_plugin.models import metadata


@pytest.fixture
def store_sessions(tmp_path) -> Iterator[sessionmaker[Session]]:
    """Sessions on a fresh SQLite file holding edge-agent's tables (usable from several threads)."""
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}", connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _busy(conn, _):
        conn.execute("PRAGMA busy_timeout=5000")

    metadata.create_all(engine)
    yield sessionmaker(bind=engine, expire_on_commit=False)
    engine.dispose()
