"""installers/install.sh and the .deb, installed into temporary roots: no change to this machine."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from pkg_helpers import ROOT, need_tool

INSTALL_SH = ROOT / "installers" / "install.sh"
BUILD_DEB = ROOT / "packaging" / "deb" / "build_deb.sh"


def install_sh(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["sh", str(INSTALL_SH), *args], input=stdin, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def users(path: Path) -> list[str]:
    return [line.split(":")[0] for line in path.read_text().splitlines()]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_sh_into_a_root_is_idempotent(onedir_binary: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    token = tmp_path / "token"
    token.write_text("eat1_abc_def\n")
    args = ["--root", str(root), "--from", str(onedir_binary.parent), "--token-file", str(token),
            "--url", "https://gw.example:8443", "--runtime-python", "/opt/rt/bin/python"]
    first = install_sh(*args)
    assert "created system user edge-agent" in first.stdout
    assert "eat1_abc_def" not in first.stdout + first.stderr

    exe = root / "opt/edge-agent/edge-agent"
    assert subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60).stdout.startswith("edge-agent ")
    assert (root / "usr/bin/edge-agent").readlink() == Path("/opt/edge-agent/edge-agent")
    unit = root / "etc/systemd/system/edge-agent.service"
    assert "ExecStart=/opt/edge-agent/edge-agent run" in unit.read_text() and mode(unit) == 0o644
    dropin = root / "etc/systemd/system/edge-agent.service.d/registration-token.conf"
    assert "LoadCredential=registration-token:/etc/edge-agent/registration-token" in dropin.read_text()
    tok = root / "etc/edge-agent/registration-token"
    assert tok.read_text() == "eat1_abc_def\n" and mode(tok) == 0o600
    env = root / "etc/edge-agent/edge-agent.env"
    assert mode(env) == 0o600
    assert "EDGE_AGENT_URL=https://gw.example:8443" in env.read_text().splitlines()
    assert "EDGE_AGENT_RUNTIME_PYTHON=/opt/rt/bin/python" in env.read_text().splitlines()

    # Operator edits survive; a second run adds no second user; a changed value replaces its line.
    env.write_text(env.read_text().replace("#HTTPS_PROXY=", "HTTPS_PROXY=http://proxy:3128"))
    install_sh("--root", str(root), "--from", str(onedir_binary.parent), "--runtime-python", "/opt/rt2/bin/python")
    lines = env.read_text().splitlines()
    assert "HTTPS_PROXY=http://proxy:3128" in lines
    assert [line for line in lines if line.startswith("EDGE_AGENT_RUNTIME_PYTHON")] == ["EDGE_AGENT_RUNTIME_PYTHON=/opt/rt2/bin/python"]
    assert users(root / "etc/passwd").count("edge-agent") == 1
    assert users(root / "etc/group").count("edge-agent") == 1
    assert not (root / "opt/edge-agent.new").exists() and not (root / "opt/edge-agent.old").exists()


def test_install_sh_prefix_user_and_token_on_stdin(onedir_binary: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nsvc:x:999:999::/:/sbin/nologin\n")
    (root / "etc/group").write_text("root:x:0:\nsvc:x:999:\n")
    install_sh("--root", str(root), "--from", str(onedir_binary.parent), "--prefix", "/srv/agent",
               "--user", "runner", "--token-file", "-", stdin="eat1_from_stdin\n")
    unit = (root / "etc/systemd/system/edge-agent.service").read_text().splitlines()
    assert "ExecStart=/srv/agent/edge-agent run" in unit and "User=runner" in unit and "Group=runner" in unit
    runner = next(line for line in (root / "etc/passwd").read_text().splitlines() if line.startswith("runner:"))
    assert runner.split(":")[2] == "998"  # the next free system id, not the one svc holds
    assert (root / "etc/edge-agent/registration-token").read_text() == "eat1_from_stdin\n"


def test_installed_unit_passes_systemd_analyze(onedir_binary: Path, tmp_path: Path) -> None:
    tool = need_tool("systemd-analyze", "systemd")
    root = tmp_path / "root"
    install_sh("--root", str(root), "--from", str(onedir_binary.parent))
    # verify checks that ExecStart exists on this machine: point it into the staging root.
    unit = tmp_path / "edge-agent.service"
    unit.write_text((root / "etc/systemd/system/edge-agent.service").read_text().replace(
        "ExecStart=/opt/edge-agent/", f"ExecStart={root}/opt/edge-agent/"))
    result = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_install_sh_refuses_bad_input(tmp_path: Path) -> None:
    result = subprocess.run(["sh", str(INSTALL_SH), "--root", str(tmp_path), "--from", str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "no onedir build" in result.stderr
    result = subprocess.run(["sh", str(INSTALL_SH), "--bogus"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "unknown option --bogus" in result.stderr


@pytest.fixture(scope="module")
def deb(onedir_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_tool("dpkg-deb", "dpkg")
    out = tmp_path_factory.mktemp("deb")
    result = subprocess.run(["sh", str(BUILD_DEB), str(onedir_binary.parent), str(out)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return Path(result.stdout.strip().splitlines()[-1])


def dpkg(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # --force-script-chrootless: maintainer scripts run on this machine with $DPKG_ROOT=root (they
    # honour it), instead of chrooting into a root that has no /bin/sh. --force-depends: the empty
    # root has no libc6 package registered.
    return subprocess.run(["dpkg", f"--root={root}", "--force-script-chrootless", "--force-depends", *args],
                          capture_output=True, text=True, timeout=300)


def test_deb_metadata_and_contents(deb: Path) -> None:
    info = subprocess.run(["dpkg-deb", "--info", str(deb)], capture_output=True, text=True, check=True).stdout
    assert "Package: edge-agent" in info and "postinst" in info
    contents = subprocess.run(["dpkg-deb", "--contents", str(deb)], capture_output=True, text=True, check=True).stdout
    assert "./opt/edge-agent/edge-agent" in contents
    assert "./lib/systemd/system/edge-agent.service" in contents
    assert "./usr/bin/edge-agent -> /opt/edge-agent/edge-agent" in contents
    assert "root/root" in contents and "airflow" not in contents.replace("Apache Airflow", "")


def test_deb_installs_and_purges_in_a_temporary_root(deb: Path, tmp_path: Path) -> None:
    need_tool("dpkg", "dpkg")
    root = tmp_path / "root"
    for d in ("var/lib/dpkg/updates", "var/lib/dpkg/info", "etc"):
        (root / d).mkdir(parents=True)
    (root / "var/lib/dpkg/status").touch()

    result = dpkg(root, "--install", str(deb))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "created system user edge-agent" in result.stdout
    exe = root / "opt/edge-agent/edge-agent"
    assert subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60).returncode == 0
    assert (root / "lib/systemd/system/edge-agent.service").read_text() == (ROOT / "packaging/systemd/edge-agent.service").read_text()
    assert mode(root / "etc/edge-agent/edge-agent.env") == 0o600
    assert "edge-agent" in users(root / "etc/passwd")

    again = dpkg(root, "--install", str(deb))  # upgrade in place: same user, config kept
    assert again.returncode == 0, again.stdout + again.stderr
    assert users(root / "etc/passwd").count("edge-agent") == 1

    purge = dpkg(root, "--purge", "edge-agent")
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert not exe.exists() and not (root / "etc/edge-agent").exists()
    shutil.rmtree(root)


def test_release_tarball_installs_with_its_own_install_sh(onedir_binary: Path, tmp_path: Path) -> None:
    import importlib.util
    import tarfile

    spec = importlib.util.spec_from_file_location("edge_agent_build", ROOT / "packaging" / "build.py")
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    tarball = build.make_tarball(onedir_binary.parent, tmp_path / "dist")
    with tarfile.open(tarball) as tar:
        assert {m.uid for m in tar.getmembers()} == {0}
        tar.extractall(tmp_path / "x", filter="tar")
    (top,) = (tmp_path / "x").iterdir()
    assert {p.name for p in top.iterdir()} == {"edge-agent", "install.sh", "edge-agent.service", "install.md"}
    root = tmp_path / "root"
    result = subprocess.run(["sh", str(top / "install.sh"), "--root", str(root)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert os.access(root / "opt/edge-agent/edge-agent", os.X_OK)
    assert (root / "etc/systemd/system/edge-agent.service").read_text() == (top / "edge-agent.service").read_text()
