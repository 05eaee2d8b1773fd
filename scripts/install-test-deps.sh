#!/usr/bin/env bash
# Install the system packages the test suite needs beyond the venv: a PostgreSQL server for tests/pg
# and a Chromium for the e2e page test.
#
# Idempotent and quiet: prints one line saying what it did; apt's output only when apt fails.
# The tests start their own throwaway cluster (scripts/pgcluster.py) and never use Debian's
# system cluster, so this script keeps that one from being started by the package's postinst
# (a temporary policy-rc.d, the Debian mechanism for "install, do not start") and stops it if
# something started it anyway.
#
# Without root (or passwordless sudo), or off Debian, a missing server is reported and the
# PostgreSQL tests skip; under CI=true that is an error instead, so CI cannot go green without them.
set -euo pipefail

say() { echo "install-test-deps: $*"; }

server_bindir() {
    # Debian layout: /usr/lib/postgresql/<major>/bin holds initdb and postgres (not on PATH).
    local dir
    for dir in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -rV); do
        if [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

cannot_install() {
    if [ -n "${CI:-}" ]; then
        say "ERROR: PostgreSQL server missing and $1; CI needs it for tests/pg" >&2
        exit 1
    fi
    say "PostgreSQL server missing and $1: install Debian's 'postgresql' package yourself; tests/pg will skip"
    exit 0
}

# tests/packaging: systemd-analyze (unit verification), dpkg-deb (the .deb) and setpriv/unshare (the
# read-only-root test). All three ship in Debian's base image; install them where they do not.
tools=()
command -v systemd-analyze >/dev/null || tools+=(systemd)
command -v dpkg-deb >/dev/null || tools+=(dpkg)
command -v setpriv >/dev/null || tools+=(util-linux)
if [ ${#tools[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${tools[@]}" >/dev/null
        say "installed ${tools[*]}"
    else
        say "missing ${tools[*]} (not root or no apt-get): tests/packaging will skip them"
    fi
fi

# tests/e2e/test_e2e_operator_ui.py: Debian's chromium, driven headless by Playwright (its own
# browser download needs the internet; the system browser does not).
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
        say "installed chromium"
    elif [ -n "${CI:-}" ]; then
        say "ERROR: chromium missing and not root (or no apt-get); CI needs it for tests/e2e" >&2
        exit 1
    else
        say "chromium missing (not root or no apt-get): install Debian's 'chromium'; the e2e page test will skip"
    fi
fi

if dir=$(server_bindir); then
    say "PostgreSQL server already installed ($dir), nothing to do"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    cannot_install "not running as root"
fi
command -v apt-get >/dev/null || cannot_install "no apt-get on this machine"

log=$(mktemp)
policy=/usr/sbin/policy-rc.d
own_policy=0
cleanup() {
    if [ "$own_policy" -eq 1 ]; then "${SUDO[@]}" rm -f "$policy"; fi
    rm -f "$log"
}
trap cleanup EXIT

# invoke-rc.d (called by the server's postinst) asks policy-rc.d; 101 = "action forbidden".
# An existing policy (Docker images ship one) is the machine's choice and is left alone.
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# Temporary, written by edge-agent scripts/install-test-deps.sh\nexit 101\n' \
        | "${SUDO[@]}" tee "$policy" >/dev/null
    "${SUDO[@]}" chmod 0755 "$policy"
    own_policy=1
fi

run_apt() {
    if ! "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive "$@" >>"$log" 2>&1; then
        say "ERROR: '$*' failed:" >&2
        cat "$log" >&2
        exit 1
    fi
}
run_apt apt-get update -q
run_apt apt-get install -y -q --no-install-recommends postgresql

if ! dir=$(server_bindir); then
    say "ERROR: 'postgresql' installed but no initdb/postgres under /usr/lib/postgresql/*/bin" >&2
    exit 1
fi

# The package creates a "main" cluster; if anything started it (a policy that allows starts),
# stop it: the tests must not depend on it, and nothing should be left listening on 5432.
stopped=""
if command -v pg_lsclusters >/dev/null; then
    while read -r ver name _port status _rest; do
        if [ "$status" = "online" ]; then
            "${SUDO[@]}" pg_ctlcluster "$ver" "$name" stop >>"$log" 2>&1 && stopped="$stopped $ver/$name"
        fi
    done < <(pg_lsclusters --no-header 2>/dev/null || true)
fi

say "installed Debian's postgresql ($dir)${stopped:+; stopped the system cluster(s)$stopped}"
