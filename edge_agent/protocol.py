"""Wire models and constants shared by the agent and the gateway.

Imports only pydantic and the standard library: the gateway imports this module, and the agent's
control process must stay free of Airflow, SQLAlchemy and FastAPI (a test pins that).

Every route lives under :data:`API_PREFIX`. Only :data:`TRUST_BUNDLE_PATH` and
:data:`REGISTER_PATH` may be called without a client certificate.
"""

from __future__ import annotations

import base64
import enum
import re
import secrets
import zlib
from urllib.parse import unquote, urlsplit
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

API_PREFIX = "/agents/v1"
TRUST_BUNDLE_PATH = f"{API_PREFIX}/trust-bundle"
REGISTER_PATH = f"{API_PREFIX}/register"
WHOAMI_PATH = f"{API_PREFIX}/whoami"
LEASE_PATH = f"{API_PREFIX}/lease"
HEARTBEAT_PATH = f"{API_PREFIX}/heartbeat"
#: POST a new CSR under the current identity; the reply is a new certificate for the same agent.
RENEW_PATH = f"{API_PREFIX}/renew"
#: DELETE: the agent removes itself (``edge-agent unregister``).
SELF_PATH = f"{API_PREFIX}/self"
EXECUTION_PREFIX = "/execution/"
#: ``PATCH`` here moves a try to running (Airflow's ``ti_run``); group 1 is the task instance id.
RUN_PATH = re.compile(r"/execution/task-instances/([^/?]+)/run(?:\?.*)?")


def execution_target_refusal(target: str) -> str | None:
    """Why a task's request target must not be relayed to the gateway, or ``None`` when it may.

    Only origin-form ``/execution/*`` targets pass, and no dot segment in the decoded path: URL
    normalisation upstream would turn ``/execution/../agents/v1/lease`` into an agent API call made
    with the agent's own certificate. A ``..`` inside a segment (``/execution/variables/a..b``) is a
    legitimate name and passes.
    """
    if not target.startswith("/"):
        return "only origin-form request targets are relayed"
    raw_path = urlsplit(target).path
    path = unquote(raw_path)
    if not (raw_path.startswith(EXECUTION_PREFIX) and path.startswith(EXECUTION_PREFIX)):
        return f"only {EXECUTION_PREFIX}* is relayed"
    # "..;x" is a dot segment to servers that strip path parameters (Tomcat): refused as well.
    if any(segment.split(";", 1)[0] in (".", "..") for segment in path.split("/")) or "\\" in path:
        return "dot segments are not allowed in relayed paths"
    return None


def job_state_path(job_id: str) -> str:
    return f"{API_PREFIX}/jobs/{job_id}/state"


def job_logs_path(job_id: str) -> str:
    return f"{API_PREFIX}/jobs/{job_id}/logs"


#: Longest time the gateway holds a lease request open; clients ask for less.
MAX_LEASE_WAIT_SECONDS = 50.0
#: Longest log chunk the gateway accepts in one request.
MAX_LOG_CHUNK_BYTES = 1 << 20


class _Model(BaseModel):
    # Unknown fields are refused: a typo or a field an agent invents to widen its scope is an error.
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------------
# Registration tokens
# ---------------------------------------------------------------------------------------------------

TOKEN_PREFIX = "eat1"
_B32 = "abcdefghijklmnopqrstuvwxyz234567"


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode().rstrip("=").lower()


def _unb32(text: str) -> bytes:
    pad = "=" * (-len(text) % 8)
    return base64.b32decode(text.upper() + pad)


class TokenFormatError(ValueError):
    """The text is not a registration token (typo, truncation, or another kind of secret)."""


@dataclass(frozen=True)
class RegistrationToken:
    """``eat1_<id>_<secret>_<ca-pin>_<crc>``: one string carries the secret and the CA pin.

    The prefix lets secret scanners recognise a leaked token; the pin (SHA-256 of the CA's
    SubjectPublicKeyInfo, as kubeadm's discovery hash) lets the agent authenticate the gateway
    *before* the secret leaves the machine; the CRC catches a truncated paste locally.
    """

    token_id: str
    secret: str
    ca_pin: bytes

    @classmethod
    def mint(cls, ca_pin: bytes) -> "RegistrationToken":
        return cls(token_id=_b32(secrets.token_bytes(5)), secret=_b32(secrets.token_bytes(16)), ca_pin=ca_pin)

    def __str__(self) -> str:
        body = f"{TOKEN_PREFIX}_{self.token_id}_{self.secret}_{_b32(self.ca_pin)}"
        return f"{body}_{_b32(zlib.crc32(body.encode()).to_bytes(4, 'big'))}"

    def __repr__(self) -> str:  # never show the secret
        return f"RegistrationToken(token_id={self.token_id!r}, secret=<redacted>)"

    @property
    def redacted(self) -> str:
        return f"{TOKEN_PREFIX}_{self.token_id}_…"

    @classmethod
    def parse(cls, text: str) -> "RegistrationToken":
        text = text.strip()
        parts = text.split("_")
        if len(parts) != 5 or parts[0] != TOKEN_PREFIX:
            raise TokenFormatError(
                f"not an edge-agent registration token (expected '{TOKEN_PREFIX}_…' with 5 parts); "
                "copy the whole line printed by 'airflow edge-agents token create'"
            )
        if any(c not in _B32 for c in "".join(parts[1:])):
            raise TokenFormatError("registration token contains characters outside its alphabet; was it altered?")
        body = "_".join(parts[:4])
        try:
            crc_ok = _unb32(parts[4]) == zlib.crc32(body.encode()).to_bytes(4, "big")
            pin = _unb32(parts[3])
        except ValueError:  # binascii.Error: a part lost characters
            crc_ok, pin = False, b""
        if not crc_ok:
            raise TokenFormatError("registration token checksum does not match: it was truncated or mistyped")
        if len(pin) != 32:
            raise TokenFormatError("registration token carries no valid CA pin")
        return cls(token_id=parts[1], secret=parts[2], ca_pin=pin)


# ---------------------------------------------------------------------------------------------------
# Registration and identity
# ---------------------------------------------------------------------------------------------------


class TrustBundle(_Model):
    """CA certificates agents must trust (two during a CA rotation)."""

    ca_pems: list[str]
    trust_domain: str


class RegisterRequest(_Model):
    token: str = Field(repr=False, max_length=256)
    csr_pem: str = Field(max_length=8192)
    name: str | None = Field(default=None, max_length=200)
    version: str = Field(max_length=64)


class AgentIdentity(_Model):
    """What the server bound the agent to. Queues and region come from the token record only."""

    agent_id: str
    name: str
    queues: list[str]
    region: str
    cert_pem: str
    ca_pems: list[str]
    cert_not_after: datetime
    #: The hosted side's ``[core] executor`` string: the Task SDK re-parses DAGs on the agent and
    #: checks each task's ``executor=`` against it, so the runtime must use the same string.
    executor: str


class WhoAmI(_Model):
    agent_id: str
    name: str
    queues: list[str]
    region: str
    state: str
    cert_not_after: datetime | None = None


# ---------------------------------------------------------------------------------------------------
# Work
# ---------------------------------------------------------------------------------------------------


class LeaseRequest(_Model):
    free_slots: int = Field(ge=0, le=10_000)
    wait_seconds: float = Field(default=30.0, ge=0.0, le=MAX_LEASE_WAIT_SECONDS)


class LogPolicy(str, enum.Enum):
    #: Task logs are shipped to the hosted side and shown in the Airflow UI.
    HOSTED = "hosted"
    #: Task logs never leave the agent's region; the UI says where they are.
    LOCAL = "local"


class Lease(_Model):
    job_id: str
    #: Fencing id: every later call about this job must present it; a stale one is refused.
    fencing: int
    queue: str
    dag_id: str
    task_id: str
    run_id: str
    map_index: int
    try_number: int
    #: The ``ExecuteTask`` workload as JSON, with a task token minted at lease time.
    workload: dict[str, Any]
    lease_expires_at: datetime
    #: From the queue's policy on the server: whether the agent may ship this task's log.
    log_policy: LogPolicy = LogPolicy.HOSTED

    @property
    def ti_id(self) -> str | None:
        """The task instance's id in the workload (the one Execution API paths name), if it has one."""
        ti = self.workload.get("ti") if isinstance(self.workload, dict) else None
        value = ti.get("id") if isinstance(ti, dict) else None
        return str(value).lower() if value is not None else None


class LeaseResponse(_Model):
    lease: Lease | None = None


class JobState(str, enum.Enum):
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    #: The agent's local policy refused the job; it was never run. The server fails the try with
    #: the reason and never offers that job to this agent again.
    REFUSED = "refused"


class JobReport(_Model):
    fencing: int
    state: JobState
    exit_code: int | None = None
    reason: str | None = Field(default=None, max_length=4000)


class LogChunk(_Model):
    fencing: int
    #: Byte offset of ``data`` in the task's log file; resent chunks are deduplicated by offset.
    offset: int = Field(ge=0)
    data: str = Field(max_length=MAX_LOG_CHUNK_BYTES)


class RunningJob(_Model):
    job_id: str
    fencing: int


class HeartbeatRequest(_Model):
    free_slots: int = Field(ge=0, le=10_000)
    total_slots: int = Field(ge=0, le=10_000)
    running: list[RunningJob] = Field(default_factory=list, max_length=10_000)
    version: str = Field(max_length=64)
    cert_not_after: datetime | None = None


class HeartbeatResponse(_Model):
    #: The server asks the agent to stop leasing and finish what it runs.
    drain: bool = False
    #: Jobs the agent reported that it no longer holds (revoked, requeued, or stale fencing).
    lost: list[str] = Field(default_factory=list)


class RenewRequest(_Model):
    """Certificate rotation: a CSR for a new key, sent under the current (still valid) certificate."""

    csr_pem: str = Field(max_length=8192)


class ErrorBody(BaseModel):
    detail: str


__all__ = [
    "API_PREFIX",
    "EXECUTION_PREFIX",
    "HEARTBEAT_PATH",
    "LEASE_PATH",
    "MAX_LEASE_WAIT_SECONDS",
    "MAX_LOG_CHUNK_BYTES",
    "REGISTER_PATH",
    "RENEW_PATH",
    "SELF_PATH",
    "TOKEN_PREFIX",
    "TRUST_BUNDLE_PATH",
    "WHOAMI_PATH",
    "AgentIdentity",
    "ErrorBody",
    "HeartbeatRequest",
    "HeartbeatResponse",
    "JobReport",
    "JobState",
    "Lease",
    "LeaseRequest",
    "LeaseResponse",
    "LogPolicy",
    "LogChunk",
    "RegisterRequest",
    "RegistrationToken",
    "RenewRequest",
    "RunningJob",
    "TokenFormatError",
    "TrustBundle",
    "WhoAmI",
    "execution_target_refusal",
    "job_logs_path",
    "job_state_path",
]
