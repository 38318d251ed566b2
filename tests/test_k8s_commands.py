"""k8s/ and docker/ against the code: every flag, port, path and environment variable a container
uses exists in `tribune ... --help`, Triton's flag set, the image or the pod spec."""
from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.k8s_support import *  # noqa: F401,F403  (helpers and the `rendered` fixture)



@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_tribune_flag_exists_and_parses(rendered, overlay, tmp_path):
    """Flags of `tribune gateway|serve|ppo` and `accelerate launch`: each appears in the command's
    --help, and the whole command line (with the PPO ConfigMap as --config) builds a valid config."""
    from accelerate.commands.launch import launch_command_parser
    from tribune.trainer.cli import _load
    from tribune.services.common.config import config_from_args

    docs = rendered[overlay]
    seen = set()
    for obj, tmpl in pod_templates(docs):
        for c in containers(tmpl["spec"], init=False):
            env = env_of(c, docs)
            if c["args"][0] == "tribune":
                command, args = c["args"][1], [expand(a, env) for a in c["args"][2:]]
            elif c["args"][0] == "accelerate":
                launch, args = ppo_parts(c, env)
                ns, unknown = launch_command_parser().parse_known_args([*launch, "x.py"])
                assert not unknown, f"accelerate launch does not know {unknown}"
                assert ns.num_processes >= 1 and ns.num_machines == obj["spec"].get("parallelism", 1)
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
                local = local_config(c, tmpl["spec"], docs, config[0], tmp_path)
                args = [a if not a.startswith("--config") else f"--config={local}" for a in args]
            ns = parser.parse_args([command, *args])
            cfg = config_from_args(_load(ns._config), ns)     # validates every value (UserError otherwise)
            assert cfg is not None
    assert seen >= {"gateway", "ppo"}, seen


def test_ppo_configmap_keys_are_ppo_options(rendered):
    from tribune.services.common.config import build_config
    from tribune.trainer.ppo_config import PPOConfig

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
    port_flags = {"--port", "--metrics-port", "--grpc-port", "--http-port",
                  "--main_process_port"}     # accelerate launch: rank 0's rendezvous (multi-node PPO)
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
    for needed in ("tribune/trainer/cli.py", "tribune/trainer/__main__.py", "tribune/services/gateway.py",
                   "tribune/services/serve.py", "tribune/v1/reward_pb2.py", "tribune/v1/reward_pb2_grpc.py"):
        assert needed in names, f"{needed} missing from the image's install"
    # one import package: nothing at the top level that the published `trainer` or `services` could clobber
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"tribune"}, names
    assert any(n.endswith("entry_points.txt") and "tribune = tribune.trainer.cli:main" in
               zipfile.ZipFile(whl).read(n).decode() for n in names)


# ================================================================ availability and scaling
