#!/bin/sh
# Build edge-agent_<version>_<arch>.deb from the onedir build, with dpkg-deb (no debhelper needed).
#
#   sh packaging/deb/build_deb.sh [ONEDIR] [OUTDIR]
#     ONEDIR  default dist/onedir/edge-agent (python packaging/build.py)
#     OUTDIR  default dist/
#
# The package puts the agent in /opt/edge-agent, links /usr/bin/edge-agent, ships the hardened unit
# as /lib/systemd/system/edge-agent.service, and its postinst runs install.sh --package-mode (service
# user, /etc/edge-agent/edge-agent.env, systemd reload). It does not start the agent: that needs a
# gateway URL or token and a runtime python, which only the operator knows (docs/install.md).
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
ONEDIR=${1:-$REPO/dist/onedir/edge-agent}
OUTDIR=${2:-$REPO/dist}

[ -x "$ONEDIR/edge-agent" ] || { echo "build_deb: no onedir build at $ONEDIR (run: python packaging/build.py)" >&2; exit 1; }
VERSION=$("$ONEDIR/edge-agent" --version | awk '{print $2}')
ARCH=$(dpkg --print-architecture)
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT

mkdir -p "$STAGE/opt" "$STAGE/usr/bin" "$STAGE/lib/systemd/system" "$STAGE/usr/share/edge-agent" \
         "$STAGE/usr/share/doc/edge-agent" "$STAGE/DEBIAN"
cp -a "$ONEDIR" "$STAGE/opt/edge-agent"
ln -s /opt/edge-agent/edge-agent "$STAGE/usr/bin/edge-agent"
install -m 0644 "$REPO/packaging/systemd/edge-agent.service" "$STAGE/lib/systemd/system/edge-agent.service"
install -m 0755 "$REPO/installers/install.sh" "$STAGE/usr/share/edge-agent/install.sh"
install -m 0644 "$REPO/docs/install.md" "$STAGE/usr/share/doc/edge-agent/install.md"
cat >"$STAGE/usr/share/doc/edge-agent/copyright" <<'COPY'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: edge-agent
License: Apache-2.0
 On Debian systems, the full text is in /usr/share/common-licenses/Apache-2.0.
COPY

INSTALLED_SIZE=$(du -sk "$STAGE" | cut -f1)
cat >"$STAGE/DEBIAN/control" <<CONTROL
Package: edge-agent
Version: $VERSION
Architecture: $ARCH
Maintainer: edge-agent maintainers <edge-agent@localhost>
Installed-Size: $INSTALLED_SIZE
Depends: libc6 (>= 2.36), passwd
Section: admin
Priority: optional
Homepage: https://airflow.apache.org/
Description: outbound-only mTLS agent that runs Apache Airflow tasks
 edge-agent leases Apache Airflow 3 tasks from a hosted gateway over mutual TLS
 and runs them on this machine with the Task SDK of a runtime Python. It only
 makes outbound connections. This package holds the standalone binary and a
 hardened systemd unit; see /usr/share/doc/edge-agent/install.md.
CONTROL

cat >"$STAGE/DEBIAN/postinst" <<'SCRIPT'
#!/bin/sh
# DPKG_ROOT: set when dpkg installs into another root (dpkg --root --force-script-chrootless).
set -e
if [ "$1" = "configure" ]; then
    "${DPKG_ROOT:-}/usr/share/edge-agent/install.sh" --package-mode --root "${DPKG_ROOT:-/}"
fi
SCRIPT
cat >"$STAGE/DEBIAN/prerm" <<'SCRIPT'
#!/bin/sh
set -e
# Stopping drains: running tasks finish first (up to the unit's TimeoutStopSec).
if [ "$1" = "remove" ] && [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
    systemctl disable --now edge-agent.service >/dev/null 2>&1 || true
fi
SCRIPT
cat >"$STAGE/DEBIAN/postrm" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = "purge" ]; then
    # The identity (private key) and task logs go with the configuration.
    rm -rf "${DPKG_ROOT:-}/etc/edge-agent" "${DPKG_ROOT:-}/var/lib/edge-agent" \
           "${DPKG_ROOT:-}/var/lib/private/edge-agent" "${DPKG_ROOT:-}/etc/systemd/system/edge-agent.service.d"
fi
if [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
SCRIPT
chmod 0755 "$STAGE/DEBIAN/postinst" "$STAGE/DEBIAN/prerm" "$STAGE/DEBIAN/postrm"

mkdir -p "$OUTDIR"
OUT="$OUTDIR/edge-agent_${VERSION}_${ARCH}.deb"
# gzip: xz would save ~20 % of a 20 MB package and cost a minute of CPU on every build.
dpkg-deb --root-owner-group -Zgzip --build "$STAGE" "$OUT" >/dev/null
echo "$OUT"
