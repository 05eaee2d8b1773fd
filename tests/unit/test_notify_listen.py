"""The PostgreSQL listener's setup without a server: its connection arguments from Airflow's URL,
and no listener at all on other databases (tests/pg runs it against a real PostgreSQL)."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, make_url
from sqlalchemy.orm import Session

from executor_plugin.gateway import pg_listen
from executor_plugin.gateway.job_channel import announce_queued


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://airflow:p%40ss@db.example:5433/airflow?sslmode=require",
        "postgresql+psycopg2://airflow:p%40ss@db.example:5433/airflow?sslmode=require",
        "postgresql://airflow:p%40ss@db.example:5433/airflow?sslmode=require",
    ],
)
def test_connection_arguments_come_from_the_url_whatever_its_driver(url):
    assert pg_listen.connect_kwargs_for(make_url(url)) == {
        "host": "db.example",
        "port": 5433,
        "dbname": "airflow",
        "user": "airflow",
        "password": "p@ss",
        "sslmode": "require",
    }


def test_a_unix_socket_url_keeps_its_host_directory():
    kwargs = pg_listen.connect_kwargs_for(make_url("postgresql+psycopg://airflow@/airflow?host=/run/postgresql"))
    assert kwargs == {"dbname": "airflow", "user": "airflow", "host": "/run/postgresql"}


def test_no_listener_unless_airflow_runs_on_postgresql(monkeypatch):
    from airflow import settings

    monkeypatch.setattr(settings, "engine", create_engine("sqlite://"))
    assert pg_listen.for_airflow_engine(lambda q: None, lambda up: None) is None


def test_listener_for_a_postgresql_engine_is_built_without_connecting(monkeypatch):
    from airflow import settings

    # create_engine does not connect: nothing listens on this port, and nothing is dialled here.
    monkeypatch.setattr(settings, "engine", create_engine("postgresql+psycopg://u:secret@127.0.0.1:9/db"))
    listener = pg_listen.for_airflow_engine(lambda q: None, lambda up: None)
    assert isinstance(listener, pg_listen.QueueListener)
    assert "secret" not in listener._where


def test_enqueue_announcement_is_a_no_op_on_sqlite(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with Session(engine) as session:
        announce_queued(session, "default")  # would fail on SQLite if it tried pg_notify()
    engine.dispose()
