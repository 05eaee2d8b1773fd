"""PyInstaller entry point of the standalone ``edge-agent`` binary: the agent's control process only.

The frozen binary never runs tasks itself: ``edge-agent run`` starts the runtime zygote with the
interpreter named by ``--runtime-python`` / ``$EDGE_AGENT_RUNTIME_PYTHON`` (a Python that has
``edge-agent`` and ``apache-airflow-task-sdk`` installed), because a frozen ``sys.executable`` is
this binary, not a Python.
"""

from edge_agent.cli import main

if __name__ == "__main__":
    main()
