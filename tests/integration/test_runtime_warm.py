"""The zygote hands its jobs a warm interpreter: the modules a task needs are imported, the heap is frozen.

Real zygote, real Task SDK, real forwarder (the fake Execution API of test_runtime.py behind it). The
interpreter's own import profiler (``PYTHONPROFILEIMPORTTIME``, inherited by every fork) shows what a
job still imports after the zygote said ``ready``: the supervisor's lines go to runtime.log, the task
process's to the task log.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_runtime import Events, FakeExecutionAPI, settings_for, workload

from edge_agent.forwarder import Forwarder
from edge_agent.runtime import Runtime

PROBE_DAG = """
    import pendulum
    from airflow.sdk import dag, task

    @dag(dag_id="rt_probe", schedule=None, start_date=pendulum.datetime(2024, 1, 1))
    def rt_probe():
        @task
        def probe():
            import gc, json
            with open({marker!r}, "w") as f:
                json.dump({{"frozen": gc.get_freeze_count()}}, f)
        probe()

    rt_probe()
"""

#: What jobs imported for themselves before the zygote did (the ~300 ms per job of docs/benchmarks.md).
MUST_BE_WARM = ("packaging", "jinja2", "airflow.sdk.definitions", "airflow.sdk.bases", "airflow.providers",
                "encodings.idna")


@pytest.fixture()
def workdir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="rtw-", dir="/tmp"))  # short: AF_UNIX paths are limited
    (base / "dags").mkdir()
    (base / "dags" / "probe.py").write_text(textwrap.dedent(PROBE_DAG).format(marker=str(base / "probe.json")))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _imported(lines: list[str]) -> list[str]:
    """Module names from ``-X importtime`` lines (``import time: self | cumulative | name``)."""
    return [line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:") and "|" in line
            and not line.rstrip().endswith("imported package")]


def test_a_job_imports_nothing_the_zygote_could_have_and_inherits_a_frozen_heap(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # the zygote's environment is built from ours
    api, events = FakeExecutionAPI(), Events()
    with Forwarder(workdir / "run" / "fwd.sock", api.send) as fwd:
        rt = Runtime(settings_for(workdir), events.on_started, events.on_exited)
        rt.start()
        try:
            after_ready = rt.log_file.stat().st_size
            wl = workload("rt_probe", "probe", "probe.py")
            rt.submit("probe", wl, str(fwd.socket_path))
            _, log_file = events.wait_started("probe")
            assert events.wait_exited("probe") == (0, None)
        finally:
            rt.stop()
    supervisor_lines = rt.log_file.read_bytes()[after_ready:].decode(errors="replace").splitlines()
    assert log_file is not None
    task_lines = [json.loads(line).get("event", "") for line in Path(log_file).read_text().splitlines()]
    imported = _imported(supervisor_lines) + _imported(task_lines)
    print(f"\nmodules a job still imported itself: {imported}", file=sys.stderr)
    cold = [m for m in imported if m.startswith(MUST_BE_WARM)]
    assert cold == [], f"jobs import these themselves; import them in the zygote (_FIRST_USE_MODULES): {cold}"
    assert json.loads((workdir / "probe.json").read_text())["frozen"] > 0, "the zygote did not gc.freeze()"
