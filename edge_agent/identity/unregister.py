"""The unregister flow: remove this agent on the server, then forget its key and certificate here.

1. Take the state directory's lock: never wipe the key from under a running ``edge-agent run``.
2. ``DELETE /agents/v1/self`` under the agent's certificate: the server marks the agent removed and
   puts its open jobs back in the queue. If the server already refuses the identity (revoked or
   removed: 401/403), it is gone there and the wipe goes ahead. If the gateway cannot be reached, or
   the certificate expired so the server cannot be told, nothing is wiped unless ``local_only``: a
   wiped agent that the server still lists could only be removed by an admin.
3. Record it in the audit log, then wipe key, certificate, CA bundle and identity (``Keystore.wipe``).
   The audit log and task logs stay.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from edge_agent import statelock
from edge_agent.errors import AuditError, ConfigError, EdgeAgentError, IdentityRejected, ServerNotTold
from edge_agent.identity.keystore import Keystore, StoredIdentity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unregistered:
    agent_id: str | None
    url: str | None
    #: What the server said: "removed", "already removed or revoked", or "not asked (--local-only)".
    server: str
    audit_log: Path


def unregister(state_dir: Path, *, local_only: bool = False, timeout: float = 30.0) -> Unregistered:
    from edge_agent.audit import AUDIT_FILE, AuditLog

    keystore = Keystore(state_dir)
    with statelock.held(state_dir):
        try:
            identity: StoredIdentity | None = keystore.load()
        except ConfigError:
            if not local_only or not keystore.exists():
                raise  # no identity at all, or a damaged one we will not touch without --local-only
            identity = None
        if local_only:
            server = "not asked (--local-only): an admin must remove or revoke the agent there"
        else:
            assert identity is not None
            server = _tell_server(identity, timeout)
        if identity is not None:
            try:
                audit = AuditLog.open(state_dir, identity.agent_id)
                try:
                    audit.append("unregistered", url=identity.url, server=server)
                finally:
                    audit.close()
            except AuditError as exc:
                log.warning("unregistering without an audit entry: %s", exc)
        keystore.wipe()
    return Unregistered(agent_id=identity.agent_id if identity else None, url=identity.url if identity else None,
                        server=server, audit_log=Path(state_dir) / AUDIT_FILE)


def _tell_server(identity: StoredIdentity, timeout: float) -> str:
    from edge_agent.client import AgentAPI
    from edge_agent.transport import build_client

    hint = "nothing was wiped; retry when it is reachable, or pass --local-only to wipe this machine's identity anyway"
    if identity.expired():
        raise ServerNotTold(
            f"this agent's certificate expired at {identity.cert_not_after.isoformat()}, so the gateway cannot be "
            f"told; {hint} (the server then keeps listing the agent until an admin revokes it)"
        )
    api = AgentAPI(build_client(identity.url, identity, timeout))
    try:
        api.unregister()
    except IdentityRejected as exc:
        log.info("the gateway no longer accepts this agent (%s): wiping", exc)
        return "already removed or revoked"
    except EdgeAgentError as exc:
        raise ServerNotTold(f"could not unregister at {identity.url}: {exc}; {hint}") from None
    finally:
        api.close()
    return "removed"


__all__ = ["Unregistered", "unregister"]
