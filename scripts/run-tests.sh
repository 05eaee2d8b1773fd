#!/usr/bin/env bash
# `make test`: the whole suite, chaos faults included.
#
# The chaos faults (tests/chaos/test_chaos_faults.py: their own PostgreSQL, 2 schedulers,
# 2 gateways, 2 agents, a 200-task DAG per fault) take about 11 minutes, most of it waiting on
# timeouts and retries. They run in a second pytest beside the rest of the suite, so the whole
# stays under 30 minutes on 2 cores. Their output goes to build/chaos/pytest.log and is printed
# when the rest is done, with the figures table; the exit code is non-zero if either failed.
#
# With arguments, only `pytest <arguments>` runs, without the chaos faults (`make test-chaos`).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
FAULTS=tests/chaos/test_chaos_faults.py

if [ "$#" -gt 0 ]; then
    exec "$PY" -m pytest -ra --ignore="$FAULTS" "$@"
fi

mkdir -p build/chaos
chaos_log=build/chaos/pytest.log
# No cache plugin: two pytest processes must not write .pytest_cache at once.
"$PY" -m pytest -ra -p no:cacheprovider "$FAULTS" >"$chaos_log" 2>&1 &
chaos_pid=$!
# Ctrl-C or a CI timeout: interrupt the chaos run too, so its fixtures stop what they started.
stop_chaos() { kill -INT "$chaos_pid" 2>/dev/null; wait "$chaos_pid" 2>/dev/null; exit 130; }
trap stop_chaos INT TERM

echo "make test: the chaos faults run beside this suite; their log: $chaos_log"
"$PY" -m pytest -ra --durations=15 --ignore="$FAULTS"
main=$?

echo
echo "make test: waiting for the chaos faults ($FAULTS)..."
wait "$chaos_pid"
chaos=$?
trap - INT TERM
echo "================================ chaos faults: $chaos_log ================================"
cat "$chaos_log"
"$PY" tests/chaos/report.py || true

if [ "$main" -ne 0 ] || [ "$chaos" -ne 0 ]; then
    echo "make test: FAILED (suite exit $main, chaos faults exit $chaos)"
    exit 1
fi
echo "make test: passed (suite and chaos faults)"
