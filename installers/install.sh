#!/bin/sh
# Install the standalone edge-agent as a systemd service. Idempotent: run it again to upgrade.
#
#   sudo ./install.sh --url https://agents.example.com:8443 --token-file token.txt \
#                     --runtime-python /opt/airflow-runtime/bin/python
#
# What it does (every path below --root, default /):
#   1. copies the onedir build to PREFIX (default /opt/edge-agent) and links /usr/bin/edge-agent to it;
#   2. creates the system user and group 'edge-agent' (no login shell, no home);
#   3. installs /etc/systemd/system/edge-agent.service and, with --token-file, the one-time
#      registration token (/etc/edge-agent/registration-token, 0600 root) plus a drop-in that hands
#      it to the agent as a systemd credential: the agent registers itself on its first start;
#   4. creates /etc/edge-agent/edge-agent.env (kept on reinstall) and sets the values given here;
#   5. on a live systemd host (--root /), reloads systemd and enables and starts the service when
#      the agent can run (a URL or an identity, and a runtime python); --no-start skips this.
#
# --root DIR installs into DIR without touching the running system (no systemctl, users are added
# to DIR/etc/passwd and DIR/etc/group directly): for image builds and for tests.
# --package-mode is what the .deb's postinst runs: dpkg already placed the files and the unit.
set -eu

PREFIX=/opt/edge-agent
ROOT=/
SOURCE=
UNIT=
USER_NAME=edge-agent
TOKEN_FILE=
URL=
RUNTIME_PYTHON=
DAGS_FOLDER=
HTTPS_PROXY_VALUE=
NO_PROXY_VALUE=
START=1
PACKAGE_MODE=0

say() { echo "install.sh: $*"; }
die() { echo "install.sh: error: $*" >&2; exit 1; }

usage() {
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'EOF'
Options:
  --root DIR              install below DIR (default /)
  --prefix DIR            where the agent's files go (default /opt/edge-agent)
  --from DIR              the onedir build (default: ./edge-agent next to this script, else dist/onedir/edge-agent)
  --unit FILE             the unit file (default: next to this script, else packaging/systemd/)
  --user NAME             service user to create and run as (default edge-agent)
  --token-file FILE       one-time registration token for the first start ('-' reads standard input)
  --url URL               the gateway, e.g. https://agents.example.com:8443 (EDGE_AGENT_URL)
  --runtime-python PATH   the Python with apache-airflow-task-sdk, edge-agent and your DAGs' dependencies
  --dags-folder DIR       where the DAG files are on this machine
  --https-proxy URL       outbound proxy (HTTPS_PROXY), e.g. http://user:pass@proxy:3128
  --no-proxy LIST         hosts that bypass the proxy (NO_PROXY)
  --no-start              do not enable or start the service
  --package-mode          only user, configuration and systemd reload (used by the .deb)
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT=$2; shift 2 ;;
        --prefix) PREFIX=$2; shift 2 ;;
        --from) SOURCE=$2; shift 2 ;;
        --unit) UNIT=$2; shift 2 ;;
        --user) USER_NAME=$2; shift 2 ;;
        --token-file) TOKEN_FILE=$2; shift 2 ;;
        --url) URL=$2; shift 2 ;;
        --runtime-python) RUNTIME_PYTHON=$2; shift 2 ;;
        --dags-folder) DAGS_FOLDER=$2; shift 2 ;;
        --https-proxy) HTTPS_PROXY_VALUE=$2; shift 2 ;;
        --no-proxy) NO_PROXY_VALUE=$2; shift 2 ;;
        --no-start) START=0; shift ;;
        --package-mode) PACKAGE_MODE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

case "$PREFIX" in /*) ;; *) die "--prefix must be an absolute path" ;; esac
case "$USER_NAME" in ''|*[!a-z0-9_-]*) die "--user must be a lower-case name" ;; esac
ROOT=${ROOT%/}
LIVE=0
[ -z "$ROOT" ] && LIVE=1
[ "$LIVE" -eq 1 ] && [ "$(id -u)" -ne 0 ] && die "run as root (or use --root DIR for a staging directory)"
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

# -- 1. files -------------------------------------------------------------------------------------
if [ "$PACKAGE_MODE" -eq 0 ]; then
    if [ -z "$SOURCE" ]; then
        for candidate in "$HERE/edge-agent" "$REPO/dist/onedir/edge-agent"; do
            if [ -x "$candidate/edge-agent" ]; then SOURCE=$candidate; break; fi
        done
    fi
    [ -n "$SOURCE" ] && [ -x "$SOURCE/edge-agent" ] \
        || die "no onedir build found: pass --from DIR (build one with 'python packaging/build.py')"
    if [ -z "$UNIT" ]; then
        for candidate in "$HERE/edge-agent.service" "$REPO/packaging/systemd/edge-agent.service"; do
            if [ -f "$candidate" ]; then UNIT=$candidate; break; fi
        done
    fi
    [ -n "$UNIT" ] && [ -f "$UNIT" ] || die "edge-agent.service not found: pass --unit FILE"

    target="$ROOT$PREFIX"
    mkdir -p "$(dirname "$target")"
    # Copy next to the old version, then swap: a failed copy leaves the installed agent untouched.
    rm -rf "$target.new"
    cp -a "$SOURCE" "$target.new"
    chown -R 0:0 "$target.new" 2>/dev/null || true
    chmod -R go-w "$target.new"
    if [ -e "$target" ]; then
        rm -rf "$target.old"
        mv "$target" "$target.old"
    fi
    mv "$target.new" "$target"
    rm -rf "$target.old"
    mkdir -p "$ROOT/usr/bin"
    ln -sfn "$PREFIX/edge-agent" "$ROOT/usr/bin/edge-agent"
    say "installed $("$target/edge-agent" --version 2>/dev/null || echo edge-agent) in $target"
fi

# -- 2. service user --------------------------------------------------------------------------------
next_free_id() {  # $1 = passwd or group file: the lowest free system id from 999 down
    id=999
    while [ "$id" -ge 100 ]; do
        if ! cut -d: -f3 "$1" 2>/dev/null | grep -qx "$id"; then echo "$id"; return 0; fi
        id=$((id - 1))
    done
    die "no free system id in $1"
}

if [ "$LIVE" -eq 1 ]; then
    if ! getent group "$USER_NAME" >/dev/null; then groupadd --system "$USER_NAME"; fi
    if ! getent passwd "$USER_NAME" >/dev/null; then
        useradd --system --gid "$USER_NAME" --home-dir /var/lib/edge-agent --no-create-home \
            --shell /usr/sbin/nologin --comment "edge-agent service" "$USER_NAME"
        say "created system user $USER_NAME"
    fi
else
    mkdir -p "$ROOT/etc"
    touch "$ROOT/etc/passwd" "$ROOT/etc/group"
    if ! cut -d: -f1 "$ROOT/etc/group" | grep -qx "$USER_NAME"; then
        gid=$(next_free_id "$ROOT/etc/group")
        echo "$USER_NAME:x:$gid:" >>"$ROOT/etc/group"
    fi
    gid=$(grep "^$USER_NAME:" "$ROOT/etc/group" | cut -d: -f3)
    if ! cut -d: -f1 "$ROOT/etc/passwd" | grep -qx "$USER_NAME"; then
        uid=$(next_free_id "$ROOT/etc/passwd")
        echo "$USER_NAME:x:$uid:$gid:edge-agent service:/var/lib/edge-agent:/usr/sbin/nologin" >>"$ROOT/etc/passwd"
        say "created system user $USER_NAME ($uid) in $ROOT/etc/passwd"
    fi
fi

# -- 3. unit and token --------------------------------------------------------------------------------
umask 022
mkdir -p "$ROOT/etc/edge-agent"
chmod 0755 "$ROOT/etc/edge-agent"
if [ "$PACKAGE_MODE" -eq 0 ]; then
    unit_dir="$ROOT/etc/systemd/system"
    mkdir -p "$unit_dir"
    sed -e "s#^ExecStart=/opt/edge-agent/edge-agent #ExecStart=$PREFIX/edge-agent #" \
        -e "s#^User=edge-agent\$#User=$USER_NAME#" -e "s#^Group=edge-agent\$#Group=$USER_NAME#" \
        "$UNIT" >"$unit_dir/edge-agent.service.tmp"
    mv "$unit_dir/edge-agent.service.tmp" "$unit_dir/edge-agent.service"
    chmod 0644 "$unit_dir/edge-agent.service"
fi
if [ -n "$TOKEN_FILE" ]; then
    token_path="$ROOT/etc/edge-agent/registration-token"
    (
        umask 077
        if [ "$TOKEN_FILE" = "-" ]; then head -n 1 >"$token_path.tmp"; else head -n 1 "$TOKEN_FILE" >"$token_path.tmp"; fi
    ) || die "cannot read the token from $TOKEN_FILE"
    [ -s "$token_path.tmp" ] || { rm -f "$token_path.tmp"; die "the token in $TOKEN_FILE is empty"; }
    chmod 0600 "$token_path.tmp"
    mv "$token_path.tmp" "$token_path"
    dropin="$ROOT/etc/systemd/system/edge-agent.service.d"
    mkdir -p "$dropin"
    cat >"$dropin/registration-token.conf" <<'EOF'
# Written by install.sh: hands the one-time registration token to 'edge-agent run' as the systemd
# credential registration-token; the agent registers on its first start and ignores the token after
# that. Once registered, you may delete this file and /etc/edge-agent/registration-token.
[Service]
LoadCredential=registration-token:/etc/edge-agent/registration-token
EOF
    say "stored the registration token in /etc/edge-agent/registration-token (0600)"
fi

# -- 4. environment file -------------------------------------------------------------------------------
env_file="$ROOT/etc/edge-agent/edge-agent.env"
if [ ! -f "$env_file" ]; then
    (umask 077; cat >"$env_file" <<'EOF'
# edge-agent service environment, read by systemd as root (keep it 0600: it may hold proxy passwords).
# Change a value, then 'systemctl restart edge-agent'. install.sh keeps this file on upgrades.
#EDGE_AGENT_URL=
#EDGE_AGENT_RUNTIME_PYTHON=
#EDGE_AGENT_DAGS_FOLDER=
#EDGE_AGENT_CONCURRENCY=4
#HTTPS_PROXY=
#NO_PROXY=
EOF
    )
fi
chmod 0600 "$env_file"

set_env() {  # KEY VALUE: replace the KEY= line (commented or not) or append it
    [ -n "$2" ] || return 0
    case "$2" in *"
"*) die "$1 must be one line" ;; esac
    tmp="$env_file.tmp"
    (umask 077; awk -v key="$1" -v line="$1=$2" '
        BEGIN { done = 0 }
        $0 ~ "^#?" key "=" { if (!done) { print line; done = 1 }; next }
        { print }
        END { if (!done) print line }' "$env_file" >"$tmp")
    mv "$tmp" "$env_file"
}
set_env EDGE_AGENT_URL "$URL"
set_env EDGE_AGENT_RUNTIME_PYTHON "$RUNTIME_PYTHON"
set_env EDGE_AGENT_DAGS_FOLDER "$DAGS_FOLDER"
set_env HTTPS_PROXY "$HTTPS_PROXY_VALUE"
set_env NO_PROXY "$NO_PROXY_VALUE"

# -- 5. systemd -----------------------------------------------------------------------------------------
if [ "$LIVE" -eq 0 ]; then
    say "installed below $ROOT; nothing started"
    exit 0
fi
if [ ! -d /run/systemd/system ]; then
    say "systemd is not running here: start the agent yourself with 'edge-agent run'"
    exit 0
fi
systemctl daemon-reload
if [ "$START" -eq 0 ] || [ "$PACKAGE_MODE" -eq 1 ]; then
    say "next: edit $env_file if needed, then 'systemctl enable --now edge-agent'"
    exit 0
fi
if ! grep -q '^EDGE_AGENT_RUNTIME_PYTHON=.' "$env_file"; then
    say "not starting: set EDGE_AGENT_RUNTIME_PYTHON in $env_file (see docs/install.md), then 'systemctl enable --now edge-agent'"
    exit 0
fi
systemctl enable edge-agent.service
systemctl restart edge-agent.service
say "edge-agent is running: 'systemctl status edge-agent', 'journalctl -u edge-agent -f'"
