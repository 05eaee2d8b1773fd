"""Who may use the Edge agents REST API: Airflow's own authentication and authorization.

Airflow gives a plugin's FastAPI app no authentication at all, so every route of
:mod:`executor_plugin.ui.api` declares one of the dependencies below.

* **Authentication** is Airflow's ``get_user``: a JWT in ``Authorization: Bearer ...`` (what
  ``POST /auth/token`` returns) or, from a browser, the UI's ``_token`` cookie, validated by the
  configured auth manager. No credential: 401; an invalid or expired one: 403 or 401 (Airflow's
  own answers, the same as ``/api/v2``).
* **Reading** (agent list, explain) needs ``is_authorized_view(JOBS)``: the read-only view of the
  deployment's own machinery (scheduler and triggerer jobs), which agents are part of. Every role
  that can log in has it by default. Explain also needs read access to the DAG's task instances,
  so it reveals nothing about a DAG the user cannot see.
* **Managing** (drain, resume, revoke) needs ``is_authorized_configuration(PUT)`` for the
  ``edge_agent`` section: these change how the whole deployment runs tasks (revoke cannot be
  undone), like a configuration change, and not any single DAG. It is the highest generic check
  every auth manager implements with the method taken into account: SimpleAuthManager grants it to
  Op and Admin only, FAB to roles with edit on Configurations. ``is_authorized_custom_view`` was
  ruled out: SimpleAuthManager ignores its method and grants it to every Viewer.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status

from airflow.api_fastapi.core_api.security import GetUserDep

#: The config section whose write permission stands for "may manage edge agents".
MANAGE_SECTION = "edge_agent"


def _auth_manager() -> Any:
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager()


def may_read(user: Any) -> bool:
    from airflow.api_fastapi.auth.managers.models.resource_details import AccessView

    return bool(_auth_manager().is_authorized_view(access_view=AccessView.JOBS, user=user))


def may_manage(user: Any) -> bool:
    from airflow.api_fastapi.auth.managers.models.resource_details import ConfigurationDetails

    return bool(
        _auth_manager().is_authorized_configuration(
            method="PUT", details=ConfigurationDetails(section=MANAGE_SECTION), user=user
        )
    )


def may_read_task_instances(user: Any, dag_id: str, team_name: str | None) -> bool:
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    return bool(
        _auth_manager().is_authorized_dag(
            method="GET",
            access_entity=DagAccessEntity.TASK_INSTANCE,
            details=DagDetails(id=dag_id, team_name=team_name),
            user=user,
        )
    )


def require_reader(user: GetUserDep) -> Any:
    if not may_read(user):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "Forbidden: viewing edge agents needs read access to Jobs")
    return user


def _same_origin(request: Request) -> None:
    """Refuse a state change a page on another origin started with the user's cookie.

    Airflow's cookie is SameSite=Lax, which stops cross-site POSTs; this also stops another
    origin of the same site (a sibling subdomain). API clients send no Origin header.
    """
    origin = request.headers.get("origin")
    if origin is None:
        return
    host = request.headers.get("host", "")
    if origin.split("://", 1)[-1].rstrip("/") != host:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"Forbidden: cross-origin request from {origin}")


def require_manager(request: Request, user: GetUserDep) -> Any:
    _same_origin(request)
    if not may_manage(user):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "Forbidden: draining, resuming and revoking agents needs write access to the "
            f"[{MANAGE_SECTION}] configuration (Op or Admin)",
        )
    return user


Reader = Annotated[Any, Depends(require_reader)]
Manager = Annotated[Any, Depends(require_manager)]

__all__ = [
    "MANAGE_SECTION",
    "Manager",
    "Reader",
    "may_manage",
    "may_read",
    "may_read_task_instances",
    "require_manager",
    "require_reader",
]
