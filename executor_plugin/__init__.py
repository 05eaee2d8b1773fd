"""Hosted side of edge-agent: the ``EdgeAgentExecutor``, its tables, the agent gateway and admin commands.

Importing this package is cheap on purpose: Airflow imports it in every component (providers,
plugins, executor lookup). ``EdgeAgentExecutor`` is resolved on first attribute access, so both
``[core] executor = executor_plugin.EdgeAgentExecutor`` and
``[core] executor = LocalExecutor,executor_plugin.EdgeAgentExecutor`` work without loading the
executor module (and with it the scheduler's imports) until an executor is actually needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from executor_plugin.executor import EdgeAgentExecutor

__all__ = ["EdgeAgentExecutor"]


def __getattr__(name: str) -> Any:
    # Airflow's ExecutorLoader resolves "executor_plugin.EdgeAgentExecutor" with
    # getattr(import_module("executor_plugin"), "EdgeAgentExecutor"), which lands here.
    if name == "EdgeAgentExecutor":
        from executor_plugin.executor import EdgeAgentExecutor

        return EdgeAgentExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
