"""k8s/: every overlay renders, validates against the Kubernetes schemas, and has the properties
the deployment needs (GPUs, probes, headless Services, security, resources, tags, PDBs, HPAs,
NetworkPolicies evaluated for who may reach whom)."""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass

import pytest
import yaml

from tests.k8s_support import *  # noqa: F401,F403  (helpers and the `rendered` fixture)

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


# The oldest Kubernetes the manifests must be accepted by (Job podFailurePolicy rules need an
# explicit `status` there), and the newest schemas kubernetes-validate ships.
OLDEST_VALIDATED = "1.33.0"


def _latest_version() -> str:
    from kubernetes_validate.utils import latest_version

    return latest_version()


SCHEMA_VERSIONS = sorted({OLDEST_VALIDATED, _latest_version()}, key=lambda v: tuple(map(int, v.split("."))))


def _validate(obj: dict, where: str, version: str):
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{where}: {obj['kind']}/{obj['metadata']['name']} is invalid for Kubernetes {version} at "
                    f"{'.'.join(map(str, e.path))}: {e.message}")


def test_schema_versions_are_shipped():
    from kubernetes_validate.utils import all_versions

    assert len(SCHEMA_VERSIONS) == 2, f"kubernetes-validate's newest schemas are {_latest_version()}"
    major, minor = map(int, _latest_version().split(".")[:2])
    assert (major, minor) >= (1, 34), f"kubernetes-validate ships schemas only up to {_latest_version()}"
    assert set(SCHEMA_VERSIONS) <= set(all_versions()), all_versions()


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schemas(rendered, version):
    for name, docs in rendered.items():
        for d in docs:
            _validate(d, f"overlays/{name}", version)
    _validate(yaml.safe_load((K8S / "components/model-repository-pvc/loader-pod.yaml").read_text()), "loader-pod.yaml",
              version)


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_schema_validation_rejects_a_broken_object(rendered, version):
    """The validation above is strict: a misspelt field or a wrong type fails."""
    import kubernetes_validate

    dep = copy.deepcopy(one(rendered["dev"], "Deployment", "tribune-reward"))
    main_container(dep)["readinessProbe"]["httpGett"] = main_container(dep)["readinessProbe"].pop("httpGet")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, version, strict=True)
    dep = copy.deepcopy(one(rendered["dev"], "Deployment", "tribune-reward"))
    main_container(dep)["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, version, strict=True)


def test_oldest_schema_requires_the_pod_condition_status(rendered):
    """What 1.33 adds to the check: a podFailurePolicy condition without `status` is rejected there
    (later schemas default it), so validating only against the newest schemas would miss it."""
    import kubernetes_validate

    job = copy.deepcopy(one(rendered["dev"], "Job", "tribune-ppo"))
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        for cond in rule.get("onPodConditions", []):
            cond.pop("status", None)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, OLDEST_VALIDATED, strict=True)
    kubernetes_validate.validate(job, _latest_version(), strict=True)


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
    from tribune.services.client import ClientConfig

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
    launch, args = ppo_parts(c, env)
    ns_launch = __import__("accelerate.commands.launch", fromlist=["x"]).launch_command_parser().parse_args(
        [*launch, "x.py"])
    gpus = int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
    nodes = job["spec"].get("parallelism", 1)
    assert ns_launch.num_machines == nodes, "one machine per pod of the Job"
    if overlay in GPU_OVERLAYS:
        assert gpus >= 1 and ns_launch.num_processes == gpus * nodes, "one rank per GPU, on every node"
    else:
        assert gpus == 0 and ns_launch.num_processes == 1
    assert "--resume" in args, "a rescheduled pod must continue from the last checkpoint"
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        for cond in rule.get("onPodConditions", []):
            assert cond.get("status") == "True", f"{rule}: Kubernetes <= 1.34 requires the condition's status"
    out = flag(args, "--output")
    mount = max((m for m in c["volumeMounts"] if out.startswith(m["mountPath"] + "/")), key=lambda m: len(m["mountPath"]))
    vol = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    pvc = one(docs, "PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"])
    assert pvc["spec"]["resources"]["requests"]["storage"]
    assert spec["restartPolicy"] == "Never" and job["spec"]["podFailurePolicy"]
    assert spec["terminationGracePeriodSeconds"] >= 60, "time to checkpoint on SIGTERM"
    assert c["image"].split("/")[-1].startswith("trainer:")


# ================================================================ multi-node PPO

def _mount_of(c: dict, spec: dict, path: str) -> tuple[dict, dict]:
    """(volumeMount, volume) that holds ``path`` in container ``c`` (the deepest mount wins)."""
    mounts = [m for m in c.get("volumeMounts", []) if (path.rstrip("/") + "/").startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{c['name']}: {path} is not on a volume"
    m = max(mounts, key=lambda m: len(m["mountPath"]))
    return m, next(v for v in spec["volumes"] if v["name"] == m["name"])


def _launch_ns(c: dict, env: dict):
    from accelerate.commands.launch import launch_command_parser

    launch, args = ppo_parts(c, env)
    ns, unknown = launch_command_parser().parse_known_args([*launch, "x.py"])
    assert not unknown, f"accelerate launch does not know {unknown}"
    return ns, args


@pytest.mark.parametrize("overlay", sorted(set(OVERLAYS) - {"prod"}))
def test_ppo_runs_on_one_node_outside_prod(rendered, overlay):
    job = one(rendered[overlay], "Job", "tribune-ppo")
    assert job["spec"].get("parallelism", 1) == 1 and job["spec"].get("completions", 1) == 1
    assert job["spec"].get("completionMode", "NonIndexed") == "NonIndexed"
    ns, _ = _launch_ns(main_container(job), env_of(main_container(job), rendered[overlay]))
    assert ns.num_machines == 1 and ns.main_process_ip is None


def test_prod_ppo_is_an_indexed_job_across_nodes(rendered):
    """One pod per node; each rank's accelerate launch gets its machine rank from the completion
    index, the number of machines from the parallelism, all GPUs of all pods as processes, and
    pod 0 of the headless Service the pods' subdomain names as the main process."""
    docs = rendered["prod"]
    job = one(docs, "Job", "tribune-ppo")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    nodes = spec["parallelism"]
    assert spec["completionMode"] == "Indexed"
    assert nodes >= 2 and spec["completions"] == nodes, "every rank runs at once, once"
    # a failed rank is retried on its own budget; one out of budget ends the Job (the others
    # cannot go on without it); a replacement starts only when the old pod is gone
    assert spec["backoffLimitPerIndex"] >= 1 and spec["maxFailedIndexes"] == 0
    assert spec["podReplacementPolicy"] == "Failed"
    assert "successPolicy" not in spec, "the Job succeeds when every rank has"
    assert "hostname" not in pod, "the Job controller names the pods JOB-INDEX"
    c = main_container(job)
    gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= 1 and c["resources"]["requests"]["nvidia.com/gpu"] == gpus
    mains = set()
    for index in range(nodes):
        env = env_of(c, docs, index=index)
        ns, args = _launch_ns(c, env)
        assert ns.multi_gpu
        assert int(ns.machine_rank) == index, "machine rank = completion index"
        assert ns.num_machines == nodes
        assert ns.num_processes == nodes * gpus, "one rank per GPU on every node"
        assert ns.num_processes % ns.num_machines == 0
        # all ranks restart together: c10d lets the torchrun agents re-form the group
        assert ns.rdzv_backend == "c10d" and int(ns.max_restarts) >= 1
        assert env.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") == "1", "restarted rounds need a fresh store"
        assert "--resume" in args
        mains.add((ns.main_process_ip, int(ns.main_process_port)))
    (host, port), = mains       # every rank agrees on the main process
    # host: pod 0 (JOB-0) . subdomain . namespace .svc.cluster.local
    parts = host.split(".")
    assert len(parts) == 6 and parts[3:] == ["svc", "cluster", "local"], host
    assert parts[0] == f"{job['metadata']['name']}-0", f"{host}: not the pod with completion index 0"
    assert parts[1] == pod["subdomain"] and parts[2] == namespace(docs), host
    svc = one(docs, "Service", pod["subdomain"])
    assert svc["spec"]["clusterIP"] == "None", "pod DNS names need a headless Service"
    assert svc["spec"].get("publishNotReadyAddresses") is True, "ranks must find each other before Ready"
    selected = pods_selected(docs, {"matchLabels": svc["spec"]["selector"]})
    assert [o["metadata"]["name"] for o, _ in selected] == [job["metadata"]["name"]], "it selects the ranks only"
    (sp,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
    _, cp = container_port(pod, sp["targetPort"])
    assert cp["containerPort"] == port and cp["name"] == "rendezvous"
    # the init container that waits for rank 0 waits for the same name
    waits = [ic for ic in pod["initContainers"] if host in [expand(a, env_of(ic, docs)) for a in ic.get("args", [])]]
    assert len(waits) == 1 and pod["initContainers"][-1] is waits[0], "wait for rank 0 last, after the inputs"


def test_prod_ppo_ranks_on_different_nodes_in_one_zone(rendered):
    job = one(rendered["prod"], "Job", "tribune-ppo")
    tmpl = job["spec"]["template"]
    labels, aff = tmpl["metadata"]["labels"], tmpl["spec"]["affinity"]
    required = aff["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert any(t["topologyKey"] == "kubernetes.io/hostname" and selector_matches(t["labelSelector"], labels)
               for t in required), "never two ranks on one node"
    preferred = aff["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert any(t["podAffinityTerm"]["topologyKey"] == "topology.kubernetes.io/zone"
               and selector_matches(t["podAffinityTerm"]["labelSelector"], labels) for t in preferred)
    assert tmpl["spec"]["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in tmpl["spec"]["tolerations"])


def test_prod_ppo_ranks_share_the_checkpoints_and_fetch_their_own_inputs(rendered):
    """Every rank writes into the checkpoint directory (rank 0 the model and optimiser, each
    rank its RNG state) and reads it on --resume: one ReadWriteMany PVC, mounted read-write.
    The inputs each pod fetches go to a pod-local volume, so no two pods write the same file."""
    docs = rendered["prod"]
    job = one(docs, "Job", "tribune-ppo")
    spec = job["spec"]["template"]["spec"]
    c = main_container(job)
    _, args = ppo_parts(c, env_of(c, docs))
    mount, vol = _mount_of(c, spec, flag(args, "--output"))
    assert not mount.get("readOnly")
    pvc = one(docs, "PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"])
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "pods on different nodes mount it"
    (fetch,) = [ic for ic in spec["initContainers"] if ic["image"].startswith("rclone/rclone:")]
    assert fetch["args"][0] == "copy"
    _, target = _mount_of(fetch, spec, fetch["args"][2])
    assert "emptyDir" in target, "inputs on a pod-local volume"
    assert not any(v["name"] == vol["name"] for ic in spec["initContainers"] for v in ic.get("volumeMounts", [])), \
        "no init container writes to the shared volume"
    for f in ("--policy", "--prompts", "--eval-prompts"):
        _, v = _mount_of(c, spec, flag(args, f))
        assert v["name"] == target["name"], f"{f}: read from what fetch-inputs wrote"


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
        # every image installs its extra at the versions CI tested
        assert re.search(r'pip install -c constraints\.txt "\.\[(gateway|serve|train)\]"', text), df.name
        if df.name in ("gateway.Dockerfile", "serve.Dockerfile"):     # serving runs ONNX graphs: no torch
            code = re.sub(r"(?m)^#.*$", "", text).replace('! python -c "import torch"', "")
            assert "TORCH_SPEC" not in text and "torch" not in code, df.name
        else:
            assert re.search(r"^ARG TORCH_SPEC=torch==[\d.]+$", text, re.M), f"{df.name}: pin torch"


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


def test_prod_keeps_tensorrt_caches_on_a_volume_where_the_export_points(rendered):
    """`export --accelerator tensorrt` names TRT_CACHE_DIR for the engine and timing caches; in prod
    every Triton pod mounts a shared persistent volume there (one sub-directory per model)."""
    from tribune.services.contract import REFERENCE
    from tribune.services.repository import TRT_CACHE_DIR, TritonSettings, model_config

    settings = TritonSettings(max_batch_size=8, queue_delay_us=100, max_queue_size=8, instance_count=1,
                              instance_kind="KIND_GPU", accelerator="tensorrt", precision_mode="FP16", warmup=False,
                              warmup_length=8)
    (acc,) = model_config(REFERENCE, settings, {}).optimization.execution_accelerators.gpu_execution_accelerator
    for cache in ("engine", "timing"):
        assert acc.parameters[f"trt_{cache}_cache_enable"] == "1"
        assert acc.parameters[f"trt_{cache}_cache_path"] == TRT_CACHE_DIR
    docs = rendered["prod"]
    sub_paths = set()
    for model, name in TRITON_MODELS.items():
        dep = one(docs, "Deployment", name)
        mount = next((m for m in main_container(dep)["volumeMounts"] if m["mountPath"] == TRT_CACHE_DIR), None)
        assert mount is not None and not mount.get("readOnly"), f"{name}: no writable volume at {TRT_CACHE_DIR}"
        volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
        claim = one(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "replicas on different nodes share it"
        sub_paths.add(mount.get("subPath"))
    assert len(sub_paths) == len(TRITON_MODELS) and None not in sub_paths, sub_paths


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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_let_only_the_ranks_reach_each_other(rendered, overlay):
    """Between the trainer's pods: the rendezvous port and any other port (NCCL, the process
    group's store), where the Job runs several pods; from nobody else, and nothing at all on one node."""
    docs = rendered[overlay]
    ns = namespace(docs)
    tmpl = {o["metadata"]["name"]: t for o, t in pod_templates(docs)}
    job = one(docs, "Job", "tribune-ppo")
    ppo = job["spec"]["template"]
    peer = Pod(dict(ppo["metadata"]["labels"]), ns)
    others = [Pod({"app": "something-else"}, ns), Pod(dict(ppo["metadata"]["labels"]), "other-namespace"),
              Pod({"app.kubernetes.io/name": "prometheus"}, "monitoring"),
              *(Pod(tmpl[n]["metadata"]["labels"], ns) for n in ("tribune-gateway", *TRITON_MODELS.values()))]
    # NCCL picks its ports at run time: a port the pod does not declare stands for them
    nccl = {**ppo, "spec": {**ppo["spec"], "containers": [{"name": "x", "ports": [{"name": "nccl", "containerPort": 45123}]}]}}
    if job["spec"].get("parallelism", 1) > 1:
        ns_launch, _ = _launch_ns(main_container(job), env_of(main_container(job), docs))
        _, rdzv = container_port(ppo["spec"], int(ns_launch.main_process_port))
        assert ingress_allowed(docs, ppo, peer, rdzv["name"]), "rank 0's rendezvous port"
        assert ingress_allowed(docs, nccl, peer, "nccl"), "NCCL between the ranks"
        for src in others:
            assert not ingress_allowed(docs, ppo, src, rdzv["name"]), src
    else:
        assert not ingress_allowed(docs, nccl, peer, "nccl"), "one pod: nothing reaches the trainer"
    for src in others:
        assert not ingress_allowed(docs, nccl, src, "nccl"), src


def test_multinode_checks_catch_broken_wiring(rendered):
    """The multi-node checks above fail on each of these mistakes."""
    def job(docs):
        return one(docs, "Job", "tribune-ppo")

    def ppo_args(docs):
        return main_container(job(docs))["args"]

    def set_env(docs, name, value):
        next(e for e in main_container(job(docs))["env"] if e["name"] == name)["value"] = value

    def replace_arg(docs, prefix, old, new):
        args = ppo_args(docs)
        i = next(i for i, a in enumerate(args) if a.startswith(prefix))
        assert old in args[i]
        args[i] = args[i].replace(old, new)

    def ppo_policy(docs):
        return one(docs, "NetworkPolicy", "tribune-ppo-peers")

    checks = {
        "NUM_PROCESSES != nodes x GPUs": (lambda d: set_env(d, "NUM_PROCESSES", "4"),
                                          test_prod_ppo_is_an_indexed_job_across_nodes),
        "NUM_MACHINES != parallelism": (lambda d: job(d)["spec"].update(parallelism=3, completions=3),
                                        test_prod_ppo_is_an_indexed_job_across_nodes),
        "completions != parallelism": (lambda d: job(d)["spec"].update(completions=3),
                                       test_prod_ppo_is_an_indexed_job_across_nodes),
        "a fixed machine rank": (lambda d: replace_arg(d, "--machine_rank", "$(JOB_COMPLETION_INDEX)", "0"),
                                 test_prod_ppo_is_an_indexed_job_across_nodes),
        "main process not pod 0": (lambda d: replace_arg(d, "--main_process_ip", "tribune-ppo-0.", "tribune-ppo-1."),
                                   test_prod_ppo_is_an_indexed_job_across_nodes),
        "subdomain without its Service": (lambda d: job(d)["spec"]["template"]["spec"].update(subdomain="elsewhere"),
                                          test_prod_ppo_is_an_indexed_job_across_nodes),
        "DNS only once Ready": (lambda d: one(d, "Service", "tribune-ppo")["spec"].update(publishNotReadyAddresses=False),
                                test_prod_ppo_is_an_indexed_job_across_nodes),
        "static rendezvous": (lambda d: replace_arg(d, "--rdzv_backend", "c10d", "static"),
                              test_prod_ppo_is_an_indexed_job_across_nodes),
        "ranks may share a node": (lambda d: job(d)["spec"]["template"]["spec"]["affinity"].pop("podAntiAffinity"),
                                   test_prod_ppo_ranks_on_different_nodes_in_one_zone),
        "checkpoints on ReadWriteOnce": (lambda d: one(d, "PersistentVolumeClaim", "tribune-ppo-workspace")["spec"]
                                         .update(accessModes=["ReadWriteOnce"]),
                                         test_prod_ppo_ranks_share_the_checkpoints_and_fetch_their_own_inputs),
        "inputs on the shared volume": (lambda d: next(m for m in job(d)["spec"]["template"]["spec"]["initContainers"][0]
                                                       ["volumeMounts"] if m["mountPath"] == "/inputs")
                                        .update(name="workspace"),
                                        test_prod_ppo_ranks_share_the_checkpoints_and_fetch_their_own_inputs),
        "ranks cannot reach each other": (lambda d: d.remove(ppo_policy(d)),
                                          lambda r: test_network_policies_let_only_the_ranks_reach_each_other(r, "prod")),
        "ranks reachable from anywhere": (lambda d: ppo_policy(d)["spec"]["ingress"][0]["from"][0]
                                          .update(namespaceSelector={}),
                                          lambda r: test_network_policies_let_only_the_ranks_reach_each_other(r, "prod")),
    }
    test_prod_ppo_is_an_indexed_job_across_nodes(rendered)     # the unbroken manifests pass
    for what, (mutate, check) in checks.items():
        docs = copy.deepcopy(rendered["prod"])
        mutate(docs)
        try:
            check({**rendered, "prod": docs})
        except (AssertionError, KeyError):
            continue
        pytest.fail(f"the multi-node checks pass although: {what}")


# ================================================================ tribune-init
