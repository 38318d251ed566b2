"""The Kubernetes deployment (k8s/, docker/): rendered, schema-checked, cross-checked, smoke-run.

* every overlay renders with `kubectl kustomize` (or a standalone `kustomize build`);
* every rendered object validates against the Kubernetes OpenAPI schemas
  (kubernetes-validate, strict, the newest Kubernetes version it ships);
* property checks tie the manifests to the code: each flag, port, path and environment
  variable a container uses exists in `tribune ... --help`, in Triton's flag set, in the
  Dockerfile's image or in the pod spec; the NetworkPolicies are evaluated for who may
  reach whom; the security contexts meet Pod Security "restricted";
* the smoke test (slow) runs the container entrypoints of the CPU overlay and of the gateway
  and PPO Job as local processes with the manifests' own arguments (ports remapped, paths
  mapped to local directories, the Service DNS names to loopback) and checks their health
  endpoints, a gateway Score call and one PPO iteration.
"""
from __future__ import annotations

import copy
import fnmatch
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
from dataclasses import dataclass
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


def env_of(container: dict, docs: list[dict], pod: dict | None = None) -> dict[str, str | None]:
    """A container's environment as Kubernetes builds it (values from fieldRefs resolved)."""
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
                assert src["fieldRef"]["fieldPath"] == "metadata.namespace", src
                env[e["name"]] = namespace(docs)
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
    from trainer.cli import build_parser

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


# ================================================================ render + schemas

def test_overlays_render(rendered):
    assert {"dev", "prod"} <= set(OVERLAYS), OVERLAYS
    for name, docs in rendered.items():
        kinds = {d["kind"] for d in docs}
        assert {"Namespace", "Deployment", "Service", "Job", "NetworkPolicy", "PodDisruptionBudget",
                "ConfigMap", "PersistentVolumeClaim"} <= kinds, (name, kinds)
        ns = namespace(docs)
        for d in docs:
            if d["kind"] != "Namespace":
                assert d["metadata"].get("namespace") == ns, (name, d["kind"], d["metadata"]["name"])
    assert find(rendered["prod"], "HorizontalPodAutoscaler") and not find(rendered["dev"], "HorizontalPodAutoscaler")


def _validate(obj: dict, where: str):
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    version = latest_version()
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{where}: {obj['kind']}/{obj['metadata']['name']} is invalid for Kubernetes {version} at "
                    f"{'.'.join(map(str, e.path))}: {e.message}")


def test_every_object_validates_against_the_kubernetes_schemas(rendered):
    from kubernetes_validate.utils import latest_version

    major, minor = map(int, latest_version().split(".")[:2])
    assert (major, minor) >= (1, 32), f"kubernetes-validate ships schemas only up to {latest_version()}"
    for name, docs in rendered.items():
        for d in docs:
            _validate(d, f"overlays/{name}")
    _validate(yaml.safe_load((K8S / "components/model-repository-pvc/loader-pod.yaml").read_text()), "loader-pod.yaml")


def test_schema_validation_rejects_a_broken_object(rendered):
    """The validation above is strict: a misspelt field or a wrong type fails."""
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    dep = copy.deepcopy(one(rendered["dev"], "Deployment", "tribune-reward"))
    main_container(dep)["readinessProbe"]["httpGett"] = main_container(dep)["readinessProbe"].pop("httpGet")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, latest_version(), strict=True)
    dep = copy.deepcopy(one(rendered["dev"], "Deployment", "tribune-reward"))
    main_container(dep)["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, latest_version(), strict=True)


# ================================================================ Triton

@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_triton_deployments_stock_triton_on_gpus(rendered, overlay):
    docs = rendered[overlay]
    known = triton_flags()
    for model, name in TRITON_MODELS.items():
        dep = one(docs, "Deployment", name)
        spec = dep["spec"]["template"]["spec"]
        c = main_container(dep)
        image, _, tag = c["image"].rpartition(":")
        assert image == TRITON_IMAGE and re.fullmatch(r"\d\d\.\d\d-py3", tag), c["image"]
        assert "command" not in c, "keep the NGC image's entrypoint (CUDA compatibility checks)"
        assert c["args"][0] == "tritonserver"
        args = c["args"][1:]
        values = flag_values(args)
        # every flag is a Triton flag, with a value of its type
        for f, vals in values.items():
            name_ = f[2:]
            assert name_ in known, f"{name}: {f} is not a tritonserver flag"
            kind = known[name_]
            for v in vals:
                if kind is None:
                    assert v is None, f"{f} takes no value"
                elif kind == "boolean":
                    assert v in ("true", "false"), f"{f}={v}: boolean"
                elif kind == "integer":
                    assert v is not None and v.isdigit(), f"{f}={v}: integer"
                elif kind != "unknown":
                    assert v is not None, f"{f} needs a value"
        assert flag(args, "--strict-readiness") == "true"
        assert flag(args, "--exit-on-error") == "true"
        assert values["--disable-auto-complete-config"] == [None]
        assert flag(args, "--model-control-mode") == "explicit"
        assert sorted(values["--load-model"]) == sorted([model, MANIFEST_MODEL])
        repo = flag(args, "--model-repository")
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == repo)
        assert mount.get("readOnly") is True
        # GPUs: limits (= requests for extended resources), GPU nodes
        res = c["resources"]
        assert int(res["limits"]["nvidia.com/gpu"]) >= 1
        assert res["requests"].get("nvidia.com/gpu", res["limits"]["nvidia.com/gpu"]) == res["limits"]["nvidia.com/gpu"]
        assert spec["nodeSelector"], "GPU node selector"
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        # memory-backed /dev/shm
        shm = next(m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm")
        vol = next(v for v in spec["volumes"] if v["name"] == shm["name"])
        assert vol["emptyDir"]["medium"] == "Memory" and vol["emptyDir"].get("sizeLimit")
        _check_triton_probes_and_metrics(dep, http_port=int(flag(args, "--http-port")),
                                         grpc_port=int(flag(args, "--grpc-port")),
                                         metrics_port=int(flag(args, "--metrics-port")))


def _check_triton_probes_and_metrics(dep: dict, http_port: int, grpc_port: int, metrics_port: int):
    spec = dep["spec"]["template"]["spec"]
    c = main_container(dep)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}, ports
    for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready"),
                        ("livenessProbe", "/v2/health/live")):
        get = c[probe]["httpGet"]
        assert get["path"] == path, (probe, get)
        assert container_port(spec, get["port"])[1]["containerPort"] == http_port
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == metrics_port == 8002
    assert ann["prometheus.io/path"] == "/metrics"


def test_cpu_overlay_serves_with_tribune_serve_on_the_same_ports_and_probes(rendered):
    if "cpu" not in rendered:
        pytest.skip("no cpu overlay")
    docs = rendered["cpu"]
    _, serve_parser = tribune_subparser("serve")
    for name in TRITON_MODELS.values():
        dep = one(docs, "Deployment", name)
        c = main_container(dep)
        assert c["args"][:2] == ["tribune", "serve"]
        ns = serve_parser.parse_args(c["args"][2:])
        _check_triton_probes_and_metrics(dep, ns.http_port, ns.grpc_port, ns.metrics_port)
        assert "nvidia.com/gpu" not in json.dumps(dep), "no GPUs in the CPU fallback"
        assert not dep["spec"]["template"]["spec"].get("nodeSelector")
        gpu = one(rendered["dev"], "Deployment", name)
        assert [p for p in c["ports"]] == [p for p in main_container(gpu)["ports"]], "same ports as stock Triton"


# ================================================================ gateway

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_grpc_health_probe_and_service(rendered, overlay):
    docs = rendered[overlay]
    dep = one(docs, "Deployment", "tribune-gateway")
    c = main_container(dep)
    assert c["args"][:2] == ["tribune", "gateway"]
    port = int(flag(c["args"], "--port"))
    probe = c["readinessProbe"]["grpc"]
    assert probe["port"] == port and probe["service"] == GATEWAY_SERVICE
    assert container_port(dep["spec"]["template"]["spec"], port)[1]["name"] == "grpc"
    for p in ("startupProbe", "livenessProbe"):
        target = c[p].get("grpc", c[p].get("tcpSocket"))
        assert container_port(dep["spec"]["template"]["spec"], target["port"])[1]["containerPort"] == port
    metrics = int(flag(c["args"], "--metrics-port"))
    assert int(dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]) == metrics
    svc = one(docs, "Service", "tribune-gateway")
    assert selector_matches({"matchLabels": svc["spec"]["selector"]}, dep["spec"]["template"]["metadata"]["labels"])
    (grpc,) = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
    assert container_port(dep["spec"]["template"]["spec"], grpc["targetPort"])[1]["containerPort"] == port


# ================================================================ Services and targets

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_services_are_headless_and_select_only_their_pods(rendered, overlay):
    docs = rendered[overlay]
    for model, name in TRITON_MODELS.items():
        svc = one(docs, "Service", name)
        assert svc["spec"]["clusterIP"] == "None", f"{name}: gRPC clients balance over pod addresses"
        selected = pods_selected(docs, {"matchLabels": svc["spec"]["selector"]})
        assert [o["metadata"]["name"] for o, _ in selected] == [name]
        (grpc,) = [p for p in svc["spec"]["ports"] if p["port"] == 8001]
        _, port = container_port(selected[0][1]["spec"], grpc["targetPort"])
        assert port["name"] == "grpc"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_clients_target_the_headless_services_round_robin(rendered, overlay):
    """Each gRPC target in an args list is dns:///SERVICE.NS.svc.cluster.local:PORT of a headless
    Service whose port leads to the gRPC port of the right Triton, and the client accepts it."""
    from services.client import ClientConfig

    docs = rendered[overlay]
    targets = {("tribune-ppo", "--reward-url"): "reward", ("tribune-ppo", "--reference-url"): "reference",
               ("tribune-gateway", "--triton-url"): "reward"}
    for (workload, f), model in targets.items():
        obj = next(o for o, _ in pod_templates(docs) if o["metadata"]["name"] == workload)
        c = main_container(obj)
        url = flag(c["args"], f)
        assert url.startswith("dns:///"), f"{workload} {f}: use dns:/// for round-robin over the pods"
        env = env_of(c, docs)
        svc, port = service_for_url(docs, url, env)
        assert svc["spec"]["clusterIP"] == "None"
        (sp,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
        (target,) = pods_selected(docs, {"matchLabels": svc["spec"]["selector"]})
        assert target[1]["metadata"]["labels"]["app.kubernetes.io/component"] == model
        assert container_port(target[1]["spec"], sp["targetPort"])[1]["name"] == "grpc"
        cfg = ClientConfig(url=expand(url, env))
        assert cfg.load_balancing == "round_robin"


# ================================================================ flags, ports, env, paths

def _ppo_parts(c: dict, env: dict) -> tuple[list[str], list[str]]:
    """accelerate launch args, and the `trainer ppo` args after `-m trainer`."""
    args = [expand(a, env) for a in c["args"]]
    assert args[:2] == ["accelerate", "launch"], args
    i = args.index("-m")
    assert args[i + 1] == "trainer" and args[i + 2] == "ppo", args
    return args[2:i], args[i + 3:]


def _local_config(c: dict, spec: dict, docs: list[dict], path: str, tmp_path: Path) -> Path:
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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_tribune_flag_exists_and_parses(rendered, overlay, tmp_path):
    """Flags of `tribune gateway|serve|ppo` and `accelerate launch`: each appears in the command's
    --help, and the whole command line (with the PPO ConfigMap as --config) builds a valid config."""
    from accelerate.commands.launch import launch_command_parser
    from trainer.cli import _load
    from trainer.config import config_from_args

    docs = rendered[overlay]
    seen = set()
    for obj, tmpl in pod_templates(docs):
        for c in containers(tmpl["spec"], init=False):
            env = env_of(c, docs)
            if c["args"][0] == "tribune":
                command, args = c["args"][1], [expand(a, env) for a in c["args"][2:]]
            elif c["args"][0] == "accelerate":
                launch, args = _ppo_parts(c, env)
                ns, unknown = launch_command_parser().parse_known_args([*launch, "x.py"])
                assert not unknown, f"accelerate launch does not know {unknown}"
                assert ns.num_processes >= 1 and ns.num_machines == 1
                command = "ppo"
            else:
                continue
            seen.add(command)
            parser, sub = tribune_subparser(command)
            helptext = sub.format_help()
            for f in flag_values(args):
                assert re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", helptext), \
                    f"{obj['metadata']['name']}: {f} is not in `tribune {command} --help`"
            config = flag_values(args).get("--config")
            if config:
                local = _local_config(c, tmpl["spec"], docs, config[0], tmp_path)
                args = [a if not a.startswith("--config") else f"--config={local}" for a in args]
            ns = parser.parse_args([command, *args])
            cfg = config_from_args(_load(ns._config), ns)     # validates every value (UserError otherwise)
            assert cfg is not None
    assert seen >= {"gateway", "ppo"}, seen


def test_ppo_configmap_keys_are_ppo_options(rendered):
    from trainer.config import build_config
    from trainer.ppo import PPOConfig

    for docs in rendered.values():
        (cm,) = [d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("tribune-ppo-config")]
        values = yaml.safe_load(cm["data"]["ppo.yaml"])
        placeholders = {"policy": "p", "prompts": "p", "reward_url": "h:1", "reference_url": "h:1", "output": "o"}
        build_config(PPOConfig, {**placeholders, **values})     # unknown keys and bad values raise


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_probes_and_targets_resolve(rendered, overlay):
    """Port flags ↔ containerPorts; probes, Service targetPorts and NetworkPolicy ports name
    ports that exist in the pods they apply to."""
    docs = rendered[overlay]
    port_flags = {"--port", "--metrics-port", "--grpc-port", "--http-port"}
    for obj, tmpl in pod_templates(docs):
        spec = tmpl["spec"]
        for c in containers(spec, init=False):
            declared = {p["containerPort"] for p in c.get("ports", [])}
            given = {int(v) for f, vals in flag_values(c.get("args", [])).items() if f in port_flags for v in vals}
            assert given == declared, f"{obj['metadata']['name']}/{c['name']}: flags {given} vs ports {declared}"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in c:
                    p = c[probe]
                    target = (p.get("httpGet") or p.get("tcpSocket") or p.get("grpc"))["port"]
                    assert container_port({"containers": [c]}, target), f"{obj['metadata']['name']} {probe}: {target}"
        ann = tmpl["metadata"].get("annotations", {})
        if "prometheus.io/port" in ann:
            assert container_port(spec, int(ann["prometheus.io/port"])), obj["metadata"]["name"]
    for svc in find(docs, "Service"):
        selected = pods_selected(docs, {"matchLabels": svc["spec"]["selector"]})
        assert selected, f"Service {svc['metadata']['name']} selects no pods"
        for _, tmpl in selected:
            for p in svc["spec"]["ports"]:
                assert container_port(tmpl["spec"], p["targetPort"]), (svc["metadata"]["name"], p)
    for pol in find(docs, "NetworkPolicy"):
        selected = pods_selected(docs, pol["spec"]["podSelector"])
        for rule in pol["spec"].get("ingress", []):
            for p in rule.get("ports", []):
                for _, tmpl in selected:
                    assert container_port(tmpl["spec"], p["port"]), (pol["metadata"]["name"], p)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_environment_variables_are_defined_and_used(rendered, overlay):
    """Every $(VAR) in command/args is defined (env, envFrom ConfigMap); every variable a
    manifest sets is used by the args or read by the program (RUNTIME_ENV, rclone's
    RCLONE_CONFIG_<REMOTE>_<OPTION> for the remote the args name)."""
    docs = rendered[overlay]
    for obj, tmpl in pod_templates(docs):
        for c in containers(tmpl["spec"]):
            env = env_of(c, docs)
            text = [*c.get("command", []), *c.get("args", [])]
            refs = {m for a in text for m in VAR_REF.findall(a)}
            for r in refs:
                assert env.get(r) is not None, f"{obj['metadata']['name']}/{c['name']}: $({r}) undefined"
            remotes = {a.split(":", 1)[0].upper() for a in text if re.match(r"^[a-z]+:\$?", a) and "://" not in a}
            for name in env:
                if name in refs or name in RUNTIME_ENV:
                    continue
                m = re.match(r"^RCLONE_CONFIG_([A-Z0-9]+)_[A-Z0-9_]+$", name)
                assert m and m.group(1) in remotes and c["image"].startswith("rclone/rclone:"), \
                    f"{obj['metadata']['name']}/{c['name']}: {name} is set but nothing uses it"
            for remote in remotes:
                assert f"RCLONE_CONFIG_{remote}_TYPE" in env, f"{c['name']}: rclone remote {remote.lower()}: unconfigured"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_paths_in_args_are_mounted(rendered, overlay):
    docs = rendered[overlay]
    for obj, tmpl in pod_templates(docs):
        for c in containers(tmpl["spec"]):
            mounts = [m["mountPath"].rstrip("/") + "/" for m in c.get("volumeMounts", [])]
            for a in c.get("args", []):
                if re.match(r"^--(include|exclude|filter)=", a):    # rclone filters: paths in the bucket
                    continue
                value = a.split("=", 1)[1] if a.startswith("--") and "=" in a else a
                if value.startswith("/"):
                    assert any((value.rstrip("/") + "/").startswith(m) for m in mounts), \
                        f"{obj['metadata']['name']}/{c['name']}: {value} is on the read-only root filesystem"


# ================================================================ security, resources, images

def _check_restricted(where: str, tmpl: dict):
    spec = tmpl["spec"]
    psc = spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(key), f"{where}: {key}"
    assert spec.get("automountServiceAccountToken") is False, f"{where}: no API token needed"
    for v in spec.get("volumes", []):
        kinds = set(v) - {"name"}
        assert kinds <= RESTRICTED_VOLUMES, f"{where}: volume {v['name']} {kinds}"
    for c in containers(spec):
        sc = {**psc, **c.get("securityContext", {})}
        w = f"{where}/{c['name']}"
        assert sc.get("runAsNonRoot") is True, f"{w}: runAsNonRoot"
        assert sc.get("runAsUser", 1) != 0, f"{w}: runAsUser 0"
        assert sc.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost"), f"{w}: seccomp"
        assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False, f"{w}: allowPrivilegeEscalation"
        assert c["securityContext"].get("readOnlyRootFilesystem") is True, f"{w}: readOnlyRootFilesystem"
        assert not c["securityContext"].get("privileged"), f"{w}: privileged"
        caps = c["securityContext"].get("capabilities", {})
        assert "ALL" in caps.get("drop", []), f"{w}: drop ALL capabilities"
        assert set(caps.get("add", [])) <= {"NET_BIND_SERVICE"}, f"{w}: capabilities"
        for p in c.get("ports", []):
            assert not p.get("hostPort"), f"{w}: hostPort"


def test_pods_meet_pod_security_restricted(rendered):
    for name, docs in rendered.items():
        (ns,) = find(docs, "Namespace")
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        for obj, tmpl in pod_templates(docs):
            _check_restricted(f"{name}: {obj['kind']}/{obj['metadata']['name']}", tmpl)
    loader = yaml.safe_load((K8S / "components/model-repository-pvc/loader-pod.yaml").read_text())
    _check_restricted("loader-pod.yaml", loader)
    # and the check can fail
    bad = copy.deepcopy(pod_templates(rendered["dev"])[0][1])
    bad["spec"]["containers"][0]["securityContext"]["capabilities"] = {"add": ["SYS_ADMIN"], "drop": ["ALL"]}
    with pytest.raises(AssertionError):
        _check_restricted("bad", bad)


def test_users_match_the_images(rendered):
    """Our images run as the uid their Dockerfile creates; Triton as the NGC image's triton-server."""
    uids = {}
    for df in DOCKER.glob("*.Dockerfile"):
        m = re.search(r"^USER (\d+):(\d+)$", df.read_text(), re.M)
        assert m and m.group(1) != "0", f"{df.name}: USER must be a numeric non-root uid:gid"
        uids[df.name.split(".")[0]] = int(m.group(1))
    for docs in rendered.values():
        for obj, tmpl in pod_templates(docs):
            (c,) = tmpl["spec"]["containers"]
            image = c["image"]
            uid = tmpl["spec"]["securityContext"]["runAsUser"]
            if image.startswith(TRITON_IMAGE):
                assert uid == 1000
            elif "/tribune/" in image:
                assert uid == uids[image.rsplit("/", 1)[1].split(":")[0]], (obj["metadata"]["name"], image)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_requests_and_limits(rendered, overlay):
    docs = rendered[overlay]
    for obj, tmpl in pod_templates(docs):
        for c in containers(tmpl["spec"]):
            w = f"{obj['metadata']['name']}/{c['name']}"
            res = c.get("resources", {})
            for r in ("cpu", "memory"):
                assert r in res.get("requests", {}) and r in res.get("limits", {}), f"{w}: {r} requests and limits"
                assert parse_quantity(res["requests"][r]) <= parse_quantity(res["limits"][r]), f"{w}: {r}"
            if "nvidia.com/gpu" in res.get("limits", {}):
                assert res["requests"].get("nvidia.com/gpu") == res["limits"]["nvidia.com/gpu"], w
            shm = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
            for m in shm:    # memory-backed emptyDirs count against the memory limit
                vol = next(v for v in tmpl["spec"]["volumes"] if v["name"] == m["name"])
                assert parse_quantity(vol["emptyDir"]["sizeLimit"]) < parse_quantity(res["limits"]["memory"]), w


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ppo_job(rendered, overlay):
    docs = rendered[overlay]
    job = one(docs, "Job", "tribune-ppo")
    spec = job["spec"]["template"]["spec"]
    c = main_container(job)
    env = env_of(c, docs)
    launch, args = _ppo_parts(c, env)
    ns_launch = __import__("accelerate.commands.launch", fromlist=["x"]).launch_command_parser().parse_args(
        [*launch, "x.py"])
    gpus = int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
    if overlay in GPU_OVERLAYS:
        assert gpus >= 1 and ns_launch.num_processes == gpus, "one rank per GPU"
    else:
        assert gpus == 0 and ns_launch.num_processes == 1
    assert "--resume" in args, "a rescheduled pod must continue from the last checkpoint"
    out = flag(args, "--output")
    mount = max((m for m in c["volumeMounts"] if out.startswith(m["mountPath"] + "/")), key=lambda m: len(m["mountPath"]))
    vol = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    pvc = one(docs, "PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"])
    assert pvc["spec"]["resources"]["requests"]["storage"]
    assert spec["restartPolicy"] == "Never" and job["spec"]["podFailurePolicy"]
    assert spec["terminationGracePeriodSeconds"] >= 60, "time to checkpoint on SIGTERM"
    assert c["image"].split("/")[-1].startswith("trainer:")


def test_images_pinned_by_tag(rendered):
    for name, docs in rendered.items():
        for obj, tmpl in pod_templates(docs):
            for c in containers(tmpl["spec"]):
                image = c["image"]
                assert "@sha256:" in image or re.search(r":[\w][\w.-]*$", image.split("/")[-1]), \
                    f"{name}: {obj['metadata']['name']}/{c['name']}: {image} is not pinned"
                assert not image.endswith(":latest"), image
                if "/tribune/" in image:
                    assert image.endswith(f":{PROJECT_VERSION}"), f"{image}: tag = project version {PROJECT_VERSION}"
    for df in DOCKER.glob("*.Dockerfile"):
        text = df.read_text()
        args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
        for base in re.findall(r"^FROM (\S+)", text, re.M):
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
            assert re.search(r":\d[\w.-]*$", base) and "latest" not in base, f"{df.name}: base {base} not pinned"
        assert re.search(r"^ARG TORCH_SPEC=torch==[\d.]+$", text, re.M), f"{df.name}: pin torch"


def test_dockerfiles_install_the_project_with_an_init(tmp_path):
    """What the Dockerfiles COPY is enough to build the project (a wheel with every package), and
    .dockerignore keeps none of it out; the entrypoint is tribune-init."""
    ignore = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and l[0] != "#"]
    copied = set()
    for df in sorted(DOCKER.glob("*.Dockerfile")):
        text = df.read_text()
        entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
        assert entry[0] == "tribune-init" and entry[-1] == "--", entry
        assert "COPY --chmod=0755 docker/tribune-init.py /usr/local/bin/tribune-init" in text
        for line in re.findall(r"^COPY (?!--)(.+)$", text, re.M):
            copied.update(line.split()[:-1])
    assert {"pyproject.toml", "trainer", "services", "protos"} <= copied
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for s in sorted(copied):
        assert not any(fnmatch.fnmatch(s, pat) or s.startswith(pat + "/") for pat in ignore), f".dockerignore drops {s}"
        src = ROOT / s
        if src.is_dir():
            shutil.copytree(src, ctx / s, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, ctx / s)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "wheel"), str(ctx)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import zipfile

    (whl,) = (tmp_path / "wheel").glob("*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for needed in ("trainer/cli.py", "trainer/__main__.py", "services/gateway.py", "services/serve.py",
                   "tribune/v1/reward_pb2.py", "tribune/v1/reward_pb2_grpc.py"):
        assert needed in names, f"{needed} missing from the image's install"
    assert any(n.endswith("entry_points.txt") and "tribune" in zipfile.ZipFile(whl).read(n).decode() for n in names)


# ================================================================ availability and scaling

def test_pdbs_protect_every_deployment_without_blocking_drains(rendered):
    for name, docs in rendered.items():
        for dep in find(docs, "Deployment"):
            labels = dep["spec"]["template"]["metadata"]["labels"]
            pdbs = [p for p in find(docs, "PodDisruptionBudget") if selector_matches(p["spec"]["selector"], labels)]
            assert len(pdbs) == 1, f"{name}: {dep['metadata']['name']} needs one PDB"
            spec = pdbs[0]["spec"]
            replicas = dep["spec"].get("replicas")
            if "minAvailable" in spec:
                assert replicas is None or int(spec["minAvailable"]) < replicas, "a drain could never proceed"
            else:
                assert int(spec["maxUnavailable"]) >= 1


def test_prod_autoscaling_and_spreading(rendered):
    docs = rendered["prod"]
    adapter = yaml.safe_load((K8S / "monitoring/prometheus-adapter-values.yaml").read_text())
    custom = {r["name"]["as"] for r in adapter["rules"]["custom"]}
    for rule in adapter["rules"]["custom"]:
        assert "nv_inference_queue_duration_us" in rule["metricsQuery"], "a Triton queue-time metric"
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in find(docs, "HorizontalPodAutoscaler")}
    assert set(hpas) == {"tribune-gateway", *TRITON_MODELS.values()}
    (m,) = hpas["tribune-gateway"]["spec"]["metrics"]
    assert m["type"] == "Resource" and m["resource"]["name"] == "cpu"
    for name in TRITON_MODELS.values():
        (m,) = hpas[name]["spec"]["metrics"]
        assert m["type"] == "Pods" and m["pods"]["metric"]["name"] in custom
    for target, hpa in hpas.items():
        dep = one(docs, "Deployment", target)
        assert "replicas" not in dep["spec"], f"{target}: the HPA owns the replica count"
        assert hpa["spec"]["minReplicas"] >= 2
        aff = dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        term = aff["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
        assert selector_matches(term["labelSelector"], dep["spec"]["template"]["metadata"]["labels"])
    for overlay in set(OVERLAYS) - {"prod"}:
        for dep in find(rendered[overlay], "Deployment"):
            assert dep["spec"]["replicas"] == 1, (overlay, dep["metadata"]["name"])


# ================================================================ NetworkPolicies

@dataclass
class Pod:
    labels: dict
    namespace: str


def ingress_allowed(docs: list[dict], dst: dict, src: Pod, port: str) -> bool:
    """Whether the NetworkPolicies let ``src`` reach pod template ``dst`` on container port ``port``."""
    ns = namespace(docs)
    dst_labels = dst["metadata"]["labels"]
    _, dst_port = container_port(dst["spec"], port)
    policies = [p for p in find(docs, "NetworkPolicy") if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                and selector_matches(p["spec"]["podSelector"], dst_labels)]
    if not policies:
        return True
    for pol in policies:
        for rule in pol["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p["port"] in (dst_port["name"], dst_port["containerPort"]) for p in ports):
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                if "ipBlock" in peer:
                    continue
                ns_ok = (selector_matches(peer["namespaceSelector"], {"kubernetes.io/metadata.name": src.namespace})
                         if "namespaceSelector" in peer else src.namespace == ns)
                pod_ok = selector_matches(peer["podSelector"], src.labels) if "podSelector" in peer else True
                if ns_ok and pod_ok:
                    return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_only_trainer_and_gateway_reach_triton(rendered, overlay):
    docs = rendered[overlay]
    ns = namespace(docs)
    tmpl = {o["metadata"]["name"]: t for o, t in pod_templates(docs)}
    pod = {n: Pod(t["metadata"]["labels"], ns) for n, t in tmpl.items()}
    stranger = Pod({"app": "something-else"}, ns)
    elsewhere = Pod(dict(tmpl["tribune-ppo"]["metadata"]["labels"]), "other-namespace")
    prometheus = Pod({"app.kubernetes.io/name": "prometheus"}, "monitoring")
    reward, reference, gateway = tmpl["tribune-reward"], tmpl["tribune-reference"], tmpl["tribune-gateway"]
    assert ingress_allowed(docs, reward, pod["tribune-ppo"], "grpc")
    assert ingress_allowed(docs, reward, pod["tribune-gateway"], "grpc")
    assert ingress_allowed(docs, reference, pod["tribune-ppo"], "grpc")
    for src in (stranger, elsewhere, prometheus, pod["tribune-reference"]):
        assert not ingress_allowed(docs, reward, src, "grpc")
        assert not ingress_allowed(docs, reward, src, "http")
    for src in (stranger, elsewhere, pod["tribune-gateway"], pod["tribune-reward"]):
        assert not ingress_allowed(docs, reference, src, "grpc")
    for dst in (reward, reference, gateway):
        assert ingress_allowed(docs, dst, prometheus, "metrics")
        assert not ingress_allowed(docs, dst, stranger, "metrics")
    for src in (stranger, elsewhere, pod["tribune-ppo"]):
        assert ingress_allowed(docs, gateway, src, "grpc"), "the gateway is the API for other systems"
    job = tmpl["tribune-ppo"]
    job = {**job, "spec": {**job["spec"], "containers": [{"name": "x", "ports": [{"name": "any", "containerPort": 1}]}]}}
    for src in (stranger, pod["tribune-gateway"]):
        assert not ingress_allowed(docs, job, src, "any"), "nothing reaches the trainer"


# ================================================================ tribune-init

def test_tribune_init_forwards_sigterm_and_waits_for_descendants(tmp_path):
    """`accelerate launch` (one process) dies on SIGTERM without passing it on; tribune-init
    --signal-descendants gets it to the trainer and exits only after the trainer finished."""
    done = tmp_path / "checkpointed"
    trainer = textwrap.dedent(f"""
        import signal, sys, time
        def stop(*_):
            time.sleep(1.0)
            open({str(done)!r}, "w").write("ok")
            sys.exit(2)
        signal.signal(signal.SIGTERM, stop)
        print("ready", flush=True)
        while True:
            time.sleep(0.05)
    """)
    launcher = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {trainer!r}]).wait()"
    proc = subprocess.Popen([sys.executable, str(DOCKER / "tribune-init.py"), "--signal-descendants", "--",
                             sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(30)
    assert done.exists(), "tribune-init exited before the trainer finished its checkpoint"
    assert rc == 128 + signal.SIGTERM   # the launcher's own fate, as a shell reports it
    ok = subprocess.run([sys.executable, str(DOCKER / "tribune-init.py"), "--", sys.executable, "-c",
                         "import sys; sys.exit(3)"], timeout=30)
    assert ok.returncode == 3


# ================================================================ smoke test: the topology on loopback

def _entrypoint(image: str) -> list[str]:
    """The image's ENTRYPOINT, from its Dockerfile, with tribune-init run from the repository."""
    name = image.rsplit("/", 1)[-1].split(":")[0]
    text = (DOCKER / f"{name}.Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    assert entry[0] == "tribune-init"
    return [sys.executable, str(DOCKER / "tribune-init.py"), *entry[1:]]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    lines: list
    ports: dict        # containerPort → local port

    def log(self) -> str:
        return "".join(self.lines)[-4000:]


def _launch(name: str, c: dict, docs: list[dict], paths: dict[str, Path], ports: dict[int, int],
            urls: dict[str, str], extra: list[str] = ()) -> Proc:
    """Runs a container's entrypoint + args as a local process: containerPorts → ``ports``,
    volume mount paths → local ``paths``, 0.0.0.0 → 127.0.0.1, Service targets → ``urls``."""
    from tests.servers import free_port

    env = env_of(c, docs)
    local_ports = {p["containerPort"]: free_port() for p in c.get("ports", [])}
    ports.update(local_ports)
    args = []
    for a in c["args"]:
        a = expand(a, env)
        for svc_url, local in urls.items():
            a = a.replace(svc_url, local)
        if a.startswith("--") and "=" in a:
            k, v = a.split("=", 1)
            if v.isdigit() and int(v) in local_ports:
                v = str(local_ports[int(v)])
            elif v == "0.0.0.0":
                v = "127.0.0.1"
            for mount, local in sorted(paths.items(), key=lambda kv: -len(kv[0])):
                if v == mount or v.startswith(mount + "/"):
                    v = str(local) + v[len(mount):]
                    break
            a = f"{k}={v}"
        args.append(a)
    venv_bin = str(Path(sys.executable).parent)
    proc_env = {**os.environ, **{k: v for k, v in env.items() if v is not None and k in RUNTIME_ENV and k != "HOME"},
                "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": str(ROOT)}
    popen = subprocess.Popen([*_entrypoint(c["image"]), *args, *extra], cwd=ROOT, env=proc_env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc = Proc(name, popen, [], local_ports)
    threading.Thread(target=lambda: [proc.lines.append(l) for l in popen.stdout], daemon=True).start()
    return proc


def _stop(proc: Proc) -> None:
    if proc.popen.poll() is None:
        proc.popen.send_signal(signal.SIGTERM)     # what the kubelet sends
        try:
            proc.popen.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait()


def _http_ok(port: int, path: str) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False


def _wait(what: str, check, proc: Proc, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        assert proc.popen.poll() is None, f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log()}"
        time.sleep(0.25)
    raise AssertionError(f"{proc.name}: {what} not reached in {timeout}s:\n{proc.log()}")


def _rclone_includes(c: dict) -> list[re.Pattern]:
    """rclone --include patterns (anchored with /, ** across directories) as regexes."""
    out = []
    for pat in flag_values(c["args"]).get("--include", []):
        rx = re.escape(pat.lstrip("/")).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        out.append(re.compile(("^" if pat.startswith("/") else "^(.*/)?") + rx + "$"))
    return out


def _fetch(c: dict, src: Path, dst: Path) -> Path:
    """What an rclone init container (`copy store:... DIR --include ...`) puts into its volume."""
    includes = _rclone_includes(c)
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src).as_posix()
        if not includes or any(rx.match(rel) for rx in includes):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dst / rel)
    return dst


@pytest.mark.slow
def test_deployment_topology_runs_on_loopback(rendered, repo_dir, sft_dir, task_dir, tmp_path):
    """The entrypoints of the manifests as local processes, wired like the cluster:
    cpu overlay: tribune serve ×2 (reward, reference) → HTTP /v2/health/ready (their probes);
    dev overlay: the gateway (repository as its init container fetches it) → gRPC health
    (its readiness probe) and a Score call; the PPO Job's command → one PPO iteration."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if "cpu" not in rendered:
        pytest.skip("no cpu overlay")
    gateway_help = subprocess.run([sys.executable, "-m", "trainer", "gateway", "--help"], capture_output=True,
                                  text=True, cwd=ROOT, timeout=120)
    gateway_built = "not built yet" not in gateway_help.stdout + gateway_help.stderr
    cpu, dev = rendered["cpu"], rendered["dev"]
    procs: list[Proc] = []
    try:
        # 1. the Tritons (CPU fallback: `tribune serve`), with the repository their volume holds
        urls = {}
        for model, name in TRITON_MODELS.items():
            dep = one(cpu, "Deployment", name)
            c = main_container(dep)
            ports: dict[int, int] = {}
            procs.append(_launch(name, c, cpu, {"/models": repo_dir, "/tmp": tmp_path}, ports, {}))
            svc = one(cpu, "Service", name)
            (sp,) = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
            target = container_port(dep["spec"]["template"]["spec"], sp["targetPort"])[1]["containerPort"]
            urls[f"{name}.{namespace(cpu)}.svc.cluster.local:{sp['port']}"] = f"127.0.0.1:{ports[target]}"
            urls[f"{name}.{namespace(dev)}.svc.cluster.local:{sp['port']}"] = f"127.0.0.1:{ports[target]}"
        for (model, name), proc in zip(TRITON_MODELS.items(), procs):
            dep = one(cpu, "Deployment", name)
            c = main_container(dep)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                get = c[probe]["httpGet"]
                port = container_port(dep["spec"]["template"]["spec"], get["port"])[1]["containerPort"]
                _wait(f"{probe} {get['path']}", lambda: _http_ok(proc.ports[port], get["path"]), proc)
            assert _http_ok(proc.ports[8002], "/metrics")

        # 2. the gateway, on the files its init container fetches (tribune.json, tokenizer/)
        if gateway_built:
            dep = one(dev, "Deployment", "tribune-gateway")
            spec = dep["spec"]["template"]["spec"]
            (fetch,) = spec["initContainers"]
            models = _fetch(fetch, repo_dir, tmp_path / "gateway-models")
            assert not (models / "reward").exists(), "the gateway needs no model weights"
            c = main_container(dep)
            ports = {}
            gw = _launch("tribune-gateway", c, dev, {"/models": models, "/tmp": tmp_path}, ports, urls)
            procs.append(gw)
            probe = c["readinessProbe"]["grpc"]
            channel = grpc.insecure_channel(f"127.0.0.1:{ports[probe['port']]}")
            stub = health_pb2_grpc.HealthStub(channel)

            def serving():
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(service=probe["service"]), timeout=2)
                    return r.status == health_pb2.HealthCheckResponse.SERVING
                except grpc.RpcError:
                    return False
            _wait("gRPC health SERVING", serving, gw, timeout=180)
            from tribune.v1 import reward_pb2, reward_pb2_grpc

            reply = reward_pb2_grpc.RewardServiceStub(channel).Score(reward_pb2.ScoreRequest(
                items=[reward_pb2.ScoreItem(prompt="name three fruits", response="apple pear plum")]), timeout=30)
            assert len(reply.rewards) == 1 and abs(reply.rewards[0]) < 1e6
            channel.close()

        # 3. the PPO Job's command: inputs as its init container fetches them, one iteration
        job = one(dev, "Job", "tribune-ppo")
        spec = job["spec"]["template"]["spec"]
        (fetch,) = spec["initContainers"]
        store = tmp_path / "store"
        shutil.copytree(sft_dir, store / "sft")
        for f in ("prompts_train.jsonl", "prompts_eval.jsonl"):
            shutil.copy(task_dir / f, store / f)
        workspace = tmp_path / "workspace"
        inputs = _fetch(fetch, store, workspace / "inputs")
        assert (inputs / "sft" / "config.json").is_file() and (inputs / "prompts_eval.jsonl").is_file()
        c = main_container(job)
        config = _local_config(c, spec, dev, flag(c["args"], "--config"), tmp_path)
        # a CPU-sized run: the Job's own arguments, capped (flags override the ConfigMap)
        caps = ["--max-steps=1", "--rollout-batch-size=8", "--mini-batch-size=4", "--ppo-epochs=1",
                "--gold-eval-size=8", "--scoring-chunk=4"]
        ppo = _launch("tribune-ppo", c, dev, {"/workspace": workspace, "/config": config.parent, "/tmp": tmp_path},
                      {}, urls, caps)
        procs.append(ppo)
        rc = ppo.popen.wait(300)
        assert rc == 0, ppo.log()
        metrics = json.loads((workspace / "ppo" / "metrics.json").read_text())
        assert "objective/scores" in metrics, metrics
        assert (workspace / "ppo" / "config.json").is_file(), "the trained policy is saved on the PVC"
        if not gateway_built:
            pytest.skip("the gateway part was skipped: `tribune gateway --help` says it is not built yet")
    finally:
        for p in reversed(procs):
            _stop(p)
    for p in procs[:2]:
        assert p.popen.returncode in (0, 128 + signal.SIGTERM), f"{p.name} did not stop cleanly:\n{p.log()}"
