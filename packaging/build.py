#!/usr/bin/env python3
"""Build the standalone ``edge-agent`` binary (the control process) with PyInstaller.

Usage::

    python packaging/build.py                  # onedir: dist/onedir/edge-agent/edge-agent
    python packaging/build.py --onefile        # onefile: dist/onefile/edge-agent
    python packaging/build.py --onedir --onefile
    python packaging/build.py --tarball        # onedir + dist/edge-agent-<version>-linux-<arch>.tar.gz

PyInstaller runs in its own venv (``build/pyi-venv``) that holds only the agent's control-process
dependencies from ``pyproject.toml`` and PyInstaller, never Airflow: a build from the developer
venv would drag in whatever else it has (Airflow, SQLAlchemy, ...), since PyInstaller follows every
optional import it can find. The Task SDK is left out too: tasks run in the runtime Python
(``--runtime-python``), not in the binary. The venv is reused while the dependency list and
PyInstaller's version are unchanged (a stamp file records both).

Standard library only, so it runs with any Python 3.11 that has a shared libpython (PyInstaller
needs ``libpython3.11.so``; pyenv and Debian's python3.11 both have it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import platform
import sys
import tarfile
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYINSTALLER = "pyinstaller==6.22.3"
#: Runtime-only dependencies: the control process never imports them (tests/unit/test_import_boundaries.py).
RUNTIME_ONLY = ("apache-airflow-task-sdk",)
#: Belt and braces: if an import of these ever sneaks into the control process, the build leaves it out
#: rather than bundling 100+ MB; the binary's own tests then fail on the missing module.
EXCLUDED_MODULES = ("airflow", "executor_plugin", "sqlalchemy", "fastapi", "starlette", "uvicorn", "alembic")


def control_requirements() -> list[str]:
    """The ``[project] dependencies`` of pyproject.toml without the runtime-only ones."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    keep = []
    for req in project["dependencies"]:
        name = req.split(";")[0].strip()
        for sep in "<>=!~[ ":
            name = name.split(sep)[0]
        if name.lower() not in RUNTIME_ONLY:
            keep.append(req)
    return keep


def venv_python(venv_dir: Path) -> Path:
    return venv_dir / "bin" / "python"


def ensure_build_venv(venv_dir: Path, base_python: str) -> Path:
    """Create or refresh the build venv; returns its python. Reinstalls only when requirements change."""
    reqs = sorted(control_requirements()) + [PYINSTALLER]
    digest = hashlib.sha256(json.dumps(reqs).encode()).hexdigest()
    stamp = venv_dir / ".edge-agent-build-stamp"
    py = venv_python(venv_dir)
    if py.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return py
    if venv_dir.exists():
        shutil.rmtree(venv_dir)
    print(f"build: creating {venv_dir} ({len(reqs)} requirements)", flush=True)
    if base_python == sys.executable and sys.prefix == sys.base_prefix:
        venv.EnvBuilder(with_pip=True).create(venv_dir)
    else:
        # From inside another venv, ask the base interpreter, so the build venv does not chain venvs.
        subprocess.run([base_python, "-m", "venv", str(venv_dir)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *reqs], check=True)
    stamp.write_text(digest + "\n")
    return py


def pyinstaller(py: Path, mode: str, dist: Path, work: Path, strip: bool) -> Path:
    """Run PyInstaller for ``mode`` ('onedir' | 'onefile'); returns the path of the executable."""
    out = dist / mode
    args = [
        str(py), "-m", "PyInstaller", f"--{mode}", "--name", "edge-agent", "--noconfirm", "--clean",
        "--log-level", "WARN",
        "--distpath", str(out), "--workpath", str(work / mode), "--specpath", str(work / mode),
        # The agent comes from this source tree, not from an installed copy that may be stale.
        "--paths", str(ROOT),
        # Backends are found through entry points at run time; static analysis misses them.
        "--collect-submodules", "keyring.backends", "--copy-metadata", "keyring",
    ]
    for module in EXCLUDED_MODULES:
        args += ["--exclude-module", module]
    if strip:
        args.append("--strip")
    args.append(str(ROOT / "packaging" / "pyinstaller" / "entry.py"))
    print(f"build: pyinstaller --{mode}", flush=True)
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(args, check=True, cwd=work)
    exe = out / "edge-agent" / "edge-agent" if mode == "onedir" else out / "edge-agent"
    if not os.access(exe, os.X_OK):
        raise SystemExit(f"build: PyInstaller finished but {exe} is not an executable")
    return exe


def make_tarball(onedir: Path, dist: Path) -> Path:
    """The release tarball: ``edge-agent-<v>/`` with the onedir build, install.sh, the unit and the docs.

    Unpack it and run ``sudo ./install.sh ...`` inside: the script finds ``./edge-agent`` and
    ``./edge-agent.service`` next to itself.
    """
    version = subprocess.run([str(onedir / "edge-agent"), "--version"], capture_output=True, text=True,
                             check=True).stdout.split()[-1]
    top = f"edge-agent-{version}"
    out = dist / f"{top}-linux-{platform.machine()}.tar.gz"
    dist.mkdir(parents=True, exist_ok=True)

    def owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    with tarfile.open(out, "w:gz") as tar:
        tar.add(onedir, arcname=f"{top}/edge-agent", filter=owned_by_root)
        for src, name in ((ROOT / "installers" / "install.sh", "install.sh"),
                          (ROOT / "packaging" / "systemd" / "edge-agent.service", "edge-agent.service"),
                          (ROOT / "docs" / "install.md", "install.md")):
            tar.add(src, arcname=f"{top}/{name}", filter=owned_by_root)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onedir", action="store_true", help="build dist/onedir/edge-agent/ (default)")
    parser.add_argument("--onefile", action="store_true", help="build dist/onefile/edge-agent")
    parser.add_argument("--tarball", action="store_true", help="also pack the onedir build with install.sh")
    parser.add_argument("--dist", type=Path, default=ROOT / "dist", help="output folder (default: dist/)")
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build", help="venv and work folder (default: build/)")
    parser.add_argument("--python", default=sys.executable,
                        help="Python 3.11 with a shared libpython to build with (default: this one)")
    parser.add_argument("--no-strip", action="store_true", help="keep debug symbols (larger binary)")
    opts = parser.parse_args(argv)
    modes = [m for m in ("onedir", "onefile") if getattr(opts, m)] or ["onedir"]
    if opts.tarball and "onedir" not in modes:
        modes.insert(0, "onedir")

    build_dir = opts.build_dir.resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    py = ensure_build_venv(build_dir / "pyi-venv", opts.python)
    for mode in modes:
        exe = pyinstaller(py, mode, opts.dist.resolve(), build_dir / "pyi-work", strip=not opts.no_strip)
        print(f"build: {exe}", flush=True)
        if mode == "onedir" and opts.tarball:
            print(f"build: {make_tarball(exe.parent, opts.dist.resolve())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
