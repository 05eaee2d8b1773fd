"""A helper process with the hosted side's Airflow config: mints tokens and queues jobs for the gateway test.

Run as ``python -m bench.dbhelper`` with the stack's hosted environment; it speaks JSON lines on
stdin/stdout. It goes through :mod:`executor_plugin.store` exactly as the admin CLI and the
executor do, so the gateway sees ordinary rows. Requests and replies::

    {"op": "tokens", "queues": ["q1", ...], "region": "r"}  -> {"tokens": ["eat1_...", ...]}   (one per queue)
    {"op": "enqueue", "queue": "q1", "key": "k"}             -> {"job_id": "...", "committed_at": <monotonic>}
    {"op": "quit"}                                            -> (exits)

Replies are lines starting with :data:`REPLY_PREFIX` (Airflow may print log lines to stdout too).
``committed_at`` is ``time.monotonic()`` right after the commit: CLOCK_MONOTONIC is one clock for
every process on the machine, so the caller can subtract it from its own reading. Token replies
carry secrets: the caller keeps them in memory and never logs them.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from datetime import timedelta
from typing import Any

REPLY_PREFIX = "BENCH-REPLY "


def _tokens(queues: list[str], region: str) -> dict[str, Any]:
    from airflow.utils.session import create_session

    from edge_agent.protocol import RegistrationToken
    from executor_plugin import store
    from executor_plugin.pki import CertificateAuthority
    from executor_plugin.settings import HostedSettings

    ca = CertificateAuthority.load(HostedSettings.from_airflow_conf().ca_dir)
    out = []
    with create_session(scoped=False) as session:
        for queue in queues:
            token = RegistrationToken.mint(ca.pin)
            store.create_token(
                session,
                token_id=token.token_id,
                secret_hash=store.hash_secret(token.secret),
                queues=[queue],
                region=region,
                name=f"bench-{queue}",
                ttl=timedelta(hours=2),
                max_uses=1,
            )
            out.append(str(token))
    return {"tokens": out}


def _enqueue(queue: str, key: str) -> dict[str, Any]:
    from airflow.utils.session import create_session

    from executor_plugin import store

    with create_session(scoped=False) as session:
        job_id = store.enqueue_job(
            session,
            # The gateway replaces the token at lease time; nothing else in it is read before an
            # agent runs it, and the simulated agents never run it.
            workload_json=json.dumps({"kind": "ExecuteTask", "token": "", "bench": True}),
            ti_id=str(uuid.uuid4()),
            dag_id="bench_gateway_longpoll",
            task_id="wake",
            run_id=key,
            map_index=-1,
            try_number=1,
            queue=queue,
            priority_weight=1,
        )
    # create_session commits on leaving the block: the job is visible to the gateway from here.
    return {"job_id": job_id, "committed_at": time.monotonic()}


def main() -> int:
    for line in sys.stdin:
        request = json.loads(line)
        op = request.get("op")
        if op == "quit":
            return 0
        try:
            if op == "tokens":
                reply = _tokens(list(request["queues"]), str(request["region"]))
            elif op == "enqueue":
                reply = _enqueue(str(request["queue"]), str(request["key"]))
            else:
                reply = {"error": f"unknown op {op!r}"}
        except Exception as exc:  # noqa: BLE001 - reported to the caller, which fails the scenario with it
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(REPLY_PREFIX + json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
