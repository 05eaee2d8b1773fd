"""The agent's one error tree; every failure is classified here once, at the edge where it happens.

::

    EdgeAgentError                      (retryable, exit code, one-line operator message)
    ├── ConfigError                     exit 2: bad option, env value or local state
    │   ├── StateMissing                no identity in the state dir: run 'edge-agent register'
    │   ├── InsecureKeyFile             private key readable by group/others: refused, like ssh
    │   ├── TokenInvalid                not a registration token (typo, truncation)
    │   ├── InvalidURL                  gateway URL is not https://host[:port][/prefix]
    │   ├── PolicyError                 the local policy file is missing (when named), unreadable or malformed
    │   └── StateDirBusy                'edge-agent run' holds the state directory
    ├── AuditError                      the audit log cannot be opened or written: no job runs unrecorded
    ├── IdentityError                   who we are is not accepted
    │   ├── PinMismatch                 the gateway's CA is not the one the token names (abort, secret unsent)
    │   ├── ServerCertInvalid           the gateway's TLS certificate fails verification against our CA
    │   ├── RegistrationRefused         token expired, used up or unknown
    │   ├── IdentityRejected            gateway does not know (401) or revoked (403) this agent
    │   └── CertificateExpired          our client certificate has expired: re-register
    ├── ServerNotTold                   unregister could not tell the gateway; nothing was wiped
    ├── GatewayUnreachable      (retry) connect/read failure, timeout, proxy refusal
    ├── ServerError             (retry) 5xx, 429, or a reply this agent cannot read
    ├── RequestRejected                 4xx the agent cannot fix by retrying (version skew, a bug)
    ├── StaleLease                      404/409 on a job: the lease moved on; drop the job
    ├── LogGap                  (retry) the gateway's copy of a task log is shorter than our offset
    └── RuntimeUnavailable              the runtime zygote could not start (Task SDK missing, bad python)

Library code raises these; ``edge_agent.cli`` is the one place that turns them into a red line on
stderr and an exit code. Loops use :attr:`EdgeAgentError.retryable` to decide between backing off
and giving up.
"""

from __future__ import annotations

from datetime import datetime, timezone


class EdgeAgentError(Exception):
    """Base of every error the agent expects; ``str(err)`` is a one-line message for an operator."""

    retryable: bool = False
    exit_code: int = 1

    def __init__(self, message: str) -> None:
        # One line: operators read these in a terminal or a journal, and a multi-line message from a
        # server body would break log parsing.
        super().__init__(" ".join(message.split()))

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(EdgeAgentError):
    """An option, environment value or local file is wrong; retrying will not help."""

    exit_code = 2


class StateMissing(ConfigError):
    def __init__(self, state_dir: object) -> None:
        super().__init__(f"no identity in {state_dir}: run 'edge-agent register --url URL --token-file -'")


class InsecureKeyFile(ConfigError):
    def __init__(self, path: object, mode: int) -> None:
        super().__init__(
            f"refusing to use private key {path}: mode {mode:04o} lets group/others read it; run 'chmod 600 {path}'"
        )


class TokenInvalid(ConfigError):
    """The text given as a registration token is malformed (checked locally, nothing was sent)."""


class InvalidURL(ConfigError):
    """The gateway URL is not an https:// URL."""


class PolicyError(ConfigError):
    """The policy file is missing (when named explicitly), unreadable or malformed."""


class StateDirBusy(ConfigError):
    """Another process ('edge-agent run') holds the state directory's lock."""


class AuditError(EdgeAgentError):
    """The audit log cannot be opened or written: the agent must not run jobs it cannot record."""


class IdentityError(EdgeAgentError):
    """The gateway or this agent does not accept the other's identity."""


class PinMismatch(IdentityError):
    def __init__(self, url: str) -> None:
        super().__init__(
            f"the CA presented by {url} does not match the pin in the token: the token was not sent; "
            "check the URL, or whether a TLS-inspecting proxy sits in between"
        )


class ServerCertInvalid(IdentityError):
    """The gateway's certificate does not verify against our CA bundle (or names another host)."""


class RegistrationRefused(IdentityError):
    """The gateway refused the registration token (expired, already used, or unknown)."""


class IdentityRejected(IdentityError):
    """The gateway does not accept this agent's certificate (unknown agent, or revoked)."""

    def __init__(self, message: str, *, revoked: bool = False) -> None:
        super().__init__(message)
        self.revoked = revoked


class CertificateExpired(IdentityError):
    def __init__(self, not_after: object) -> None:
        if isinstance(not_after, datetime):
            not_after = not_after.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        super().__init__(
            f"this agent's certificate expired at {not_after}: re-register with a new token "
            "('edge-agent register --force ...')"
        )


class ServerNotTold(EdgeAgentError):
    """``unregister`` could not tell the gateway (unreachable, certificate expired); nothing was wiped."""


class GatewayUnreachable(EdgeAgentError):
    """The gateway could not be reached or the connection broke; try again later."""

    retryable = True


class ServerError(EdgeAgentError):
    """The gateway failed (5xx), asked us to slow down (429), or sent an unreadable reply."""

    retryable = True


class RequestRejected(EdgeAgentError):
    """The gateway refused a request as malformed; retrying the same request will not help."""


class StaleLease(EdgeAgentError):
    """The gateway no longer holds this job for us (stale fencing id, requeued or unknown job)."""


class LogGap(EdgeAgentError):
    """The gateway's copy of the task log ends before the chunk's offset: resend from ``size``."""

    retryable = True

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


class RuntimeUnavailable(EdgeAgentError):
    """The task runtime (zygote) could not start."""


__all__ = [
    "AuditError",
    "CertificateExpired",
    "ConfigError",
    "EdgeAgentError",
    "GatewayUnreachable",
    "IdentityError",
    "IdentityRejected",
    "InsecureKeyFile",
    "InvalidURL",
    "LogGap",
    "PinMismatch",
    "PolicyError",
    "RegistrationRefused",
    "RequestRejected",
    "RuntimeUnavailable",
    "ServerCertInvalid",
    "ServerError",
    "ServerNotTold",
    "StaleLease",
    "StateDirBusy",
    "StateMissing",
    "TokenInvalid",
]
