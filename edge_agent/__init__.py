"""edge-agent: runs Airflow 3 tasks inside the customer's own network, outbound-only over mutual TLS.

The control process (``edge-agent run``) never imports Airflow; task execution happens in a
separate runtime zygote (``edge_agent.runtime``) that holds the Task SDK and never sees the
agent's private key.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
