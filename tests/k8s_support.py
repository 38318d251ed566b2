"""Shared by the k8s tests: rendering overlays, walking objects, flag sets, wiring helpers."""
from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml


ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
DOCKER = ROOT / "docker"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
GPU_OVERLAYS = ["dev", "prod"]
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver"
TRITON_MODELS = {"reward": "tribune-reward", "reference": "tribune-reference"}
MANIFEST_MODEL = "tribune_manifest"
GATEWAY_SERVICE = "tribune.v1.RewardService"
PROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# Pod Security "restricted": the volume types it allows
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
# Environment variables a manifest may set without referencing them in its args: what reads them
RUNTIME_ENV = {
    "OMP_NUM_THREADS": "OpenMP thread pools of torch / ONNX Runtime, and accelerate launch",
    "HOME": "rclone looks for its config file under $HOME (read-only root filesystem: /tmp)",
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "torchrun's c10d rendezvous: a new process-group store every round",
}
INSTALL_KUBECTL = ("needs `kubectl` (>= 1.27, bundles kustomize v5) or `kustomize` (>= 5.0) on PATH: "
                   "https://kubernetes.io/docs/tasks/tools/ or https://kubectl.docs.kubernetes.io/installation/kustomize/")


# ---------------------------------------------------------------- rendering

def _kustomize_cmd() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def render(path: Path) -> list[dict]:
    cmd = _kustomize_cmd()
    if cmd is None:
        pytest.skip(f"cannot render k8s/: {INSTALL_KUBECTL}")
    proc = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} {path.relative_to(ROOT)} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_templates(docs: list[dict]) -> list[tuple[dict, dict]]:
    """(object, pod template {metadata, spec}) for every workload that makes pods."""
    out = []
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            out.append((d, d["spec"]["template"]))
        elif d["kind"] == "CronJob":
            out.append((d, d["spec"]["jobTemplate"]["spec"]["template"]))
        elif d["kind"] == "Pod":
            out.append((d, d))
    return out


def containers(spec: dict, init: bool = True) -> list[dict]:
    return [*(spec.get("initContainers", []) if init else []), *spec["containers"]]


def main_container(obj: dict) -> dict:
    (c,) = obj["spec"]["template"]["spec"]["containers"]
    return c


def namespace(docs: list[dict]) -> str:
    (ns,) = find(docs, "Namespace")
    return ns["metadata"]["name"]


def configmap_data(docs: list[dict], name: str) -> dict[str, str]:
    return one(docs, "ConfigMap", name)["data"]


# ---------------------------------------------------------------- small helpers

def flag_values(args: list[str]) -> dict[str, list[str | None]]:
    """--flag=value / --flag value / --flag → {--flag: [value or None, ...]}."""
    out: dict[str, list[str | None]] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            if "=" in a:
                k, v = a.split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("-"):
                k, v = a, args[i + 1]
                i += 1
            else:
                k, v = a, None
            out.setdefault(k, []).append(v)
        i += 1
    return out


def flag(args: list[str], name: str) -> str:
    values = flag_values(args).get(name)
    assert values and len(values) == 1, f"{name} must be given once in {args}"
    return values[0]


# the annotation the Job controller puts on each pod of an Indexed Job (and reads
# JOB_COMPLETION_INDEX from)
COMPLETION_INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def env_of(container: dict, docs: list[dict], pod: dict | None = None, index: int = 0) -> dict[str, str | None]:
    """A container's environment as Kubernetes builds it (values from fieldRefs resolved), in
    the pod with completion index ``index`` where the pod belongs to an Indexed Job."""
    env: dict[str, str | None] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(configmap_data(docs, src["configMapRef"]["name"]))
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            src = e["valueFrom"]
            if "fieldRef" in src:
                path = src["fieldRef"]["fieldPath"]
                assert path in ("metadata.namespace", COMPLETION_INDEX_FIELD), src
                env[e["name"]] = namespace(docs) if path == "metadata.namespace" else str(index)
            elif "resourceFieldRef" in src:
                ref = src["resourceFieldRef"]
                res, kind = ref["resource"].split(".")
                value = container["resources"][res][kind]
                env[e["name"]] = str(max(1, int(-(-parse_quantity(value) // parse_quantity(ref.get("divisor", "1"))))))
            else:
                env[e["name"]] = None
    return env


VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(value: str, env: dict[str, str | None]) -> str:
    """Kubernetes' $(VAR) expansion in command and args."""
    def sub(m):
        assert env.get(m.group(1)) is not None, f"$({m.group(1)}) is not defined in the container's environment"
        return env[m.group(1)]
    return VAR_REF.sub(sub, value)


QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30,
          "Ti": 2 ** 40}


def parse_quantity(q) -> float:
    m = QUANTITY.match(str(q))
    assert m and m.group(2) in SUFFIX, f"bad quantity {q!r}"
    return float(m.group(1)) * SUFFIX[m.group(2)]


def selector_matches(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (matchLabels + matchExpressions); {} matches everything."""
    selector = selector or {}
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions", []):
        k, op, vals = e["key"], e["operator"], e.get("values", [])
        if op == "In" and labels.get(k) not in vals:
            return False
        if op == "NotIn" and k in labels and labels[k] in vals:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


def pods_selected(docs: list[dict], selector: dict) -> list[tuple[dict, dict]]:
    return [(o, t) for o, t in pod_templates(docs) if selector_matches(selector, t["metadata"].get("labels", {}))]


def container_port(pod_spec: dict, port) -> tuple[dict, dict] | None:
    """(container, port) that a named or numbered port refers to in a pod."""
    for c in pod_spec["containers"]:
        for p in c.get("ports", []):
            if port == p.get("name") or port == p["containerPort"]:
                return c, p
    return None


SERVICE_URL = re.compile(r"^(?:dns:///)?(?P<host>[a-z0-9.$()_A-Z-]+):(?P<port>\d+)$")


def service_for_url(docs: list[dict], url: str, env: dict) -> tuple[dict, int]:
    """The Service a gRPC target names (NAME.NS.svc.cluster.local or NAME), and its port."""
    m = SERVICE_URL.match(expand(url, env))
    assert m, f"not a host:port / dns:///host:port target: {url}"
    host = m.group("host")
    parts = host.split(".")
    assert len(parts) == 1 or (len(parts) == 5 and parts[2:] == ["svc", "cluster", "local"]
                               and parts[1] == namespace(docs)), f"{host}: not a Service of this namespace"
    return one(docs, "Service", parts[0]), int(m.group("port"))


# ---------------------------------------------------------------- the flag sets

def tribune_subparser(command: str):
    from tribune.trainer.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return parser, sub.choices[command]


def triton_flags() -> dict[str, str | None]:
    """Triton's flags: name → value type ('boolean', 'integer', 'string', ... or None: no value).

    Names from PyTriton's list of tritonserver arguments; types from `tritonserver --help` of
    the server binary the nvidia-pytriton wheel ships (when it runs on this machine).
    """
    from pytriton.server.triton_server_config import TritonServerConfig

    names = set(TritonServerConfig.server_arg_keys)
    types: dict[str, str | None] = {n: "unknown" for n in names}
    binary = Path(__import__("pytriton").__file__).parent / "tritonserver" / "bin" / "tritonserver"
    try:
        out = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=30)
        helptext = out.stdout + out.stderr
    except OSError:
        helptext = ""
    for m in re.finditer(r"^  --([a-z0-9-]+)(?: <(.+)>)?$", helptext, re.M):
        if m.group(1) in names:
            types[m.group(1)] = m.group(2)
    return types

def ppo_parts(c: dict, env: dict) -> tuple[list[str], list[str]]:
    """accelerate launch args, and the `trainer ppo` args after `-m tribune.trainer`."""
    args = [expand(a, env) for a in c["args"]]
    assert args[:2] == ["accelerate", "launch"], args
    i = args.index("-m")
    assert args[i + 1] == "tribune.trainer" and args[i + 2] == "ppo", args
    return args[2:i], args[i + 3:]


def local_config(c: dict, spec: dict, docs: list[dict], path: str, tmp_path: Path) -> Path:
    """The file a container sees at ``path`` when it comes from a ConfigMap volume, written locally."""
    for m in c["volumeMounts"]:
        if path.startswith(m["mountPath"].rstrip("/") + "/"):
            vol = next(v for v in spec["volumes"] if v["name"] == m["name"])
            assert "configMap" in vol, f"{path} is not on a ConfigMap volume"
            key = path[len(m["mountPath"].rstrip("/")) + 1:]
            data = configmap_data(docs, vol["configMap"]["name"])
            assert key in data, f"{path}: key {key} missing from ConfigMap {vol['configMap']['name']}"
            out = tmp_path / key
            out.write_text(data[key])
            return out
    raise AssertionError(f"{path} is not mounted")
