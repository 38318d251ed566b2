"""Smoke test of the deployment topology: the containers' entrypoints run as local processes with
the manifests' own arguments (ports remapped, Service names on loopback) and answer their probes."""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.k8s_support import *  # noqa: F401,F403  (helpers and the `rendered` fixture)

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
    from tribune.services.launcher import free_ports

    env = env_of(c, docs)
    wanted = [p["containerPort"] for p in c.get("ports", [])]
    local_ports = dict(zip(wanted, free_ports(len(wanted))))
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
            _wait("Triton /metrics", lambda: _http_ok(proc.ports[8002], "/metrics"), proc, timeout=60)

        # 2. the gateway, on the files its init container fetches (tribune.json, tokenizer/)
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
        config = local_config(c, spec, dev, flag(c["args"], "--config"), tmp_path)
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
    finally:
        for p in reversed(procs):
            _stop(p)
    for p in procs[:2]:
        assert p.popen.returncode in (0, 128 + signal.SIGTERM), f"{p.name} did not stop cleanly:\n{p.log()}"


# ================================================================ multi-node PPO: the rendezvous on loopback

RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys, time, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    e = os.environ
    info = {k: e[k] for k in ("RANK", "WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RESTART_COUNT", "MASTER_PORT")}
    print("START " + json.dumps(info), flush=True)
    deadline = time.time() + 120
    while not os.path.exists(sys.argv[1]) and time.time() < deadline:   # train until told to finish
        t = torch.ones(1); dist.all_reduce(t); time.sleep(0.2)
    t = torch.ones(1); dist.all_reduce(t)
    dist.barrier()
    print("DONE " + json.dumps({**info, "sum": t.item()}), flush=True)
    dist.destroy_process_group()
""")


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and everything below it (torchrun starts its workers in new sessions)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(b")") + 2:].split()[1]), []).append(int(entry))
    todo, found = [pid], []
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    for p in found:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_prod_ppo_ranks_rejoin_after_a_machine_dies(rendered, tmp_path):
    """The prod Job's `accelerate launch` arguments and torch environment, one launcher per
    completion index on loopback (rank 0's pod name → 127.0.0.1, a free port, one CPU process
    per machine, gloo, a small script in place of the trainer): the machines rendezvous through
    rank 0's c10d store; when machine 1 is killed mid-run (its node went away) and a replacement
    is started (the Job's new pod for that index), machine 0's ranks restart and every rank
    finishes together in a new round. Not covered: pod DNS, NCCL, GPUs."""
    from tests.servers import free_port

    docs = rendered["prod"]
    job = one(docs, "Job", "tribune-ppo")
    c = main_container(job)
    nodes = job["spec"]["parallelism"]
    port = free_port()
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    finish = tmp_path / "finish"
    venv_bin = Path(sys.executable).parent

    def launch(index: int, name: str) -> Proc:
        env = env_of(c, docs, index=index)
        launch_args, _ = ppo_parts(c, env)
        args = []
        for a in launch_args:
            k, eq, v = a.partition("=")
            v = {"--main_process_ip": "127.0.0.1", "--main_process_port": str(port),
                 "--num_processes": str(nodes)}.get(k, v)
            args.append(f"{k}{eq}{v}")
        assert f"--machine_rank={index}" in args
        proc_env = {**os.environ, **{k: v for k, v in env.items() if k.startswith(("TORCH", "NCCL"))},
                    "PATH": str(venv_bin) + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1",
                    "PYTHONUNBUFFERED": "1"}
        popen = subprocess.Popen([str(venv_bin / "accelerate"), "launch", *args, str(script), str(finish)], env=proc_env,
                                 cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
        proc = Proc(name, popen, [], {})
        threading.Thread(target=lambda: [proc.lines.append(l) for l in popen.stdout], daemon=True).start()
        return proc

    def events(proc: Proc, kind: str) -> list[dict]:
        return [json.loads(l.split(" ", 1)[1]) for l in list(proc.lines) if l.startswith(kind + " ")]

    # machine 0 first, until its c10d store listens: on loopback every launcher sees itself as the
    # store's host, and accelerate refuses to start rank 0 when another launcher bound the port first
    procs = [launch(0, "machine 0")]
    deadline = time.time() + 120
    while time.time() < deadline:
        assert procs[0].popen.poll() is None, f"machine 0 exited:\n{procs[0].log()}"
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    procs += [launch(i, f"machine {i}") for i in range(1, nodes)]
    try:
        deadline = time.time() + 180
        while sum(len(events(p, "START")) for p in procs) < nodes and time.time() < deadline:
            for p in procs:
                assert p.popen.poll() is None, f"{p.name} exited:\n{p.log()}"
            time.sleep(0.5)
        first = [e for p in procs for e in events(p, "START")]
        assert sorted(int(e["RANK"]) for e in first) == list(range(nodes)), first
        assert {e["WORLD_SIZE"] for e in first} == {str(nodes)}
        time.sleep(2)                              # a few steps together
        _kill_tree(procs[1].popen.pid)             # machine 1's node goes away
        procs[1].popen.wait(30)
        time.sleep(2)
        finish.touch()                             # the next round runs to the end
        replacement = launch(1, "machine 1 (replacement)")
        procs.append(replacement)
        for p in (procs[0], replacement, *procs[2:-1]):
            try:
                rc = p.popen.wait(180)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{p.name} did not finish after the replacement joined:\n{p.log()}")
            assert rc == 0, f"{p.name} failed:\n{p.log()}"
    finally:
        for p in procs:
            if p.popen.poll() is None:
                _kill_tree(p.popen.pid)
    done = [e for p in (procs[0], replacement, *procs[2:-1]) for e in events(p, "DONE")]
    assert sorted(int(e["RANK"]) for e in done) == list(range(nodes)), done
    assert all(e["sum"] == nodes for e in done), done
    survivor = events(procs[0], "DONE")
    assert survivor and int(survivor[0]["TORCHELASTIC_RESTART_COUNT"]) >= 1, "machine 0's ranks restarted"
    assert len({e["MASTER_PORT"] for e in done}) == 1 and done[0]["MASTER_PORT"] != first[0]["MASTER_PORT"], \
        "the new round has its own process-group store"
