"""The runtime zygote's environment: the agent's environment plus the Airflow settings a worker needs.

Every ``AIRFLOW__*`` value below is a default: when the operator already set the variable in the
agent's environment, theirs wins (Airflow reads env vars before ``airflow.cfg``, so this is the
operator's override channel). No Airflow imports: the control process builds this.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_agent.runtime import RuntimeSettings

#: ``[workers] execution_api_timeout``. The SDK default of 5 s is shorter than the first request to
#: a cold Execution API (5-12 s measured), which made ``PATCH /run`` time out and retry; the retry
#: then raced the abandoned attempt. 30 s covers a cold gateway plus the relay through the forwarder.
EXECUTION_API_TIMEOUT_SECONDS = "30"

#: ``[workers] min_heartbeat_interval`` (an integer, so 1 is the floor). The supervisor's monitor
#: loop can sleep this long after the task process closed its sockets before it notices the exit,
#: so the default 5 s adds up to 5 s to every task. Measured here, trivial task, submit to exited,
#: six runs each: interval 5 -> 5.5, 0.3, 5.2, 5.6, 5.7, 5.2 s; interval 1 -> 0.2, 1.2, 1.4, 1.4,
#: 0.4, 1.4 s. The price is one ``PUT .../heartbeat`` per running task per second through the
#: gateway, which is small next to a task slot held 4 s longer.
MIN_HEARTBEAT_INTERVAL_SECONDS = "1"

#: ``[database] sql_alchemy_conn``. Workers need no database: every read goes through the
#: Execution API. Importing Airflow still builds an engine from this URL, so it must parse, but
#: ``/dev/null`` is not a directory, so any attempt to use a database fails loudly ("unable to open
#: database file") instead of silently creating ``$AIRFLOW_HOME/airflow.db`` on the agent.
NO_DATABASE_URL = "sqlite:////dev/null/edge-agent-runtime-has-no-database"

#: ``[workers] execution_api_retries``, ``execution_api_retry_wait_max`` and
#: ``max_failed_heartbeats``: how long a running task rides out a gateway outage. Every Execution
#: API call of a task goes through the gateway; with the SDK defaults (5 retries, about 31 s in
#: all) a gateway restart or a short partition made the supervisor give up on a call and, after
#: three failed heartbeats, kill a healthy task. With 10 retries waiting up to 30 s each, one call
#: survives a few minutes of outage, and the supervisor still stops a task after three heartbeats
#: failed that way, about when Airflow's own task heartbeat timeout would have failed it anyway.
EXECUTION_API_RETRIES = "10"
EXECUTION_API_RETRY_WAIT_MAX_SECONDS = "30"
MAX_FAILED_HEARTBEATS = "3"

#: Variables of the control process that are none of a task's business: the agent's own settings
#: (``EDGE_AGENT_TOKEN`` carries a registration secret, others name the key store) and systemd's
#: credential, state and runtime directories (the key and the forwarder socket live there). Tasks
#: inherit the zygote's environment; the zygote gets the socket path per job, nothing else.
_PRIVATE_PREFIXES = ("EDGE_AGENT_",)
_PRIVATE_NAMES = frozenset({"CREDENTIALS_DIRECTORY", "STATE_DIRECTORY", "RUNTIME_DIRECTORY"})


def build_env(settings: RuntimeSettings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for ``<python> -m edge_agent.runtime.zygote``.

    ``base`` defaults to ``os.environ``. Creates ``airflow_home`` and ``log_folder`` if missing.
    """
    env = {
        k: v
        for k, v in (os.environ if base is None else base).items()
        if not k.startswith(_PRIVATE_PREFIXES) and k not in _PRIVATE_NAMES
    }
    settings.airflow_home.mkdir(parents=True, exist_ok=True)
    settings.log_folder.mkdir(parents=True, exist_ok=True)

    # The agent's config decides where Airflow lives; without it Airflow would use ~/airflow.
    # No airflow.cfg is needed: the env vars below cover everything a worker reads.
    env["AIRFLOW_HOME"] = str(settings.airflow_home)

    defaults = {
        # The Task SDK re-parses the DAG file and rejects a task whose executor= is not in the
        # worker's [core] executor, so it must carry the hosted side's string.
        "AIRFLOW__CORE__EXECUTOR": settings.executor,
        # Where the supervisor writes task logs ({base_log_folder}/{log_path}); the agent ships them.
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(settings.log_folder),
        # Example DAGs would add an "example_dags" bundle and slow every parse.
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": EXECUTION_API_TIMEOUT_SECONDS,
        "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": MIN_HEARTBEAT_INTERVAL_SECONDS,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": NO_DATABASE_URL,
        "AIRFLOW__WORKERS__EXECUTION_API_RETRIES": EXECUTION_API_RETRIES,
        "AIRFLOW__WORKERS__EXECUTION_API_RETRY_WAIT_MAX": EXECUTION_API_RETRY_WAIT_MAX_SECONDS,
        "AIRFLOW__WORKERS__MAX_FAILED_HEARTBEATS": MAX_FAILED_HEARTBEATS,
        # Any stray print in the zygote goes to runtime.log unbuffered, next to the traceback it explains.
        "PYTHONUNBUFFERED": "1",
    }
    if settings.dags_folder is not None:
        # The default "dags-folder" bundle (LocalDagBundle without a path) reads [core] dags_folder.
        defaults["AIRFLOW__CORE__DAGS_FOLDER"] = str(settings.dags_folder)
    for key, value in defaults.items():
        env.setdefault(key, value)
    return env


__all__ = [
    "EXECUTION_API_RETRIES",
    "EXECUTION_API_RETRY_WAIT_MAX_SECONDS",
    "EXECUTION_API_TIMEOUT_SECONDS",
    "MAX_FAILED_HEARTBEATS",
    "MIN_HEARTBEAT_INTERVAL_SECONDS",
    "NO_DATABASE_URL",
    "build_env",
]
