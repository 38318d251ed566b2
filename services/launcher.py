"""`tribune serve` as a child process: free ports, wait for readiness, clean shutdown.

Used by `tribune demo`, the benchmarks and the tests: the server runs exactly as a user
would run it, in its own process, and is stopped with SIGTERM (then SIGKILL).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

READY = "tribune serve: ready"
PORT_CLASH = "each endpoint needs a port of its own"    # `tribune serve`'s error when two of its ports are equal


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports, free when picked. Every socket stays bound until all are, so that the
    kernel cannot hand the same port out twice (three separate picks once gave Triton its gRPC port
    as its HTTP port too)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


@dataclass
class ServeProcess:
    """A running `tribune serve` and its ports; ``lines`` collects its output."""
    proc: subprocess.Popen
    grpc_port: int
    http_port: int
    metrics_port: int
    lines: list[str] = field(default_factory=list)
    gateway_port: int | None = None            # with ``start_serve(..., gateway=True)``

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def gateway_url(self) -> str:
        if self.gateway_port is None:
            raise ValueError("this server was started without the gateway (start_serve(..., gateway=True))")
        return f"127.0.0.1:{self.gateway_port}"

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _pump(stream, lines: list[str], echo: bool) -> None:
    for line in stream:
        lines.append(line)
        if echo:
            sys.stderr.write(line)


def start_serve(repo: Path, *extra: str, ports: tuple[int, int, int] | None = None, gateway: bool = False,
                timeout: float = 180, echo: bool = False, ready: str = READY,
                command: list[str] | None = None) -> ServeProcess:
    """Starts `tribune serve --repository REPO` on free (or given) ports; returns once ready.
    ``gateway``: with the text gateway too, on a free port of its own (``ServeProcess.gateway_url``; its
    metrics endpoint off unless ``extra`` sets ``--gateway-metrics-port``).
    ``command`` runs another `tribune` than this interpreter's (default ``python -m tribune.trainer``).
    A free port is free when it is picked, not when the server binds it: another process (a parallel
    job) may take it in between, so with picked ports a server that finds one in use starts again."""
    if gateway and "--gateway-port" in extra:
        raise ValueError("start_serve(gateway=True) picks the gateway's port itself: leave --gateway-port out")
    start = lambda: _start_serve(repo, *extra, ports=ports, gateway=gateway, timeout=timeout,  # noqa: E731
                                 echo=echo, ready=ready, command=command)
    for _ in range(2 if ports is None else 0):      # given ports are the caller's to change
        try:
            return start()
        except PortInUse:
            pass
    return start()


class PortInUse(RuntimeError):
    """`tribune serve` exited because a port it was given is in use, or two of them were equal."""


def _start_serve(repo: Path, *extra: str, ports: tuple[int, int, int] | None, gateway: bool, timeout: float,
                 echo: bool, ready: str, command: list[str] | None) -> ServeProcess:
    picked = free_ports(4 if gateway else 3)
    grpc, http, metrics = ports or picked[:3]
    # four distinct picks: at least one differs from the three ports in use (given or picked)
    gateway_port = next(p for p in picked if p not in (grpc, http, metrics)) if gateway else None
    with_gateway = ["--with-gateway", "--gateway-port", str(gateway_port)] if gateway else []
    if gateway and "--gateway-metrics-port" not in extra:
        with_gateway += ["--gateway-metrics-port", "0"]       # a fixed default port would clash between servers
    proc = subprocess.Popen(
        [*(command or [sys.executable, "-m", "tribune.trainer"]), "serve", "--repository", str(repo),
         "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics), *with_gateway, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    served = ServeProcess(proc, grpc, http, metrics, gateway_port=gateway_port)
    threading.Thread(target=_pump, args=(proc.stdout, served.lines, echo), daemon=True).start()
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(ready in line for line in served.lines):
            return served
        if proc.poll() is not None:
            time.sleep(0.2)
            whole = "".join(served.lines)       # the first error, and the end (Triton may print its usage after it)
            output = whole if len(whole) <= 6000 else whole[:2000] + "\n[…]\n" + whole[-4000:]
            taken = "address already in use" in output.lower() or PORT_CLASH in output
            error = PortInUse if taken else RuntimeError
            raise error(f"tribune serve exited with {proc.returncode}:\n{output}")
        time.sleep(0.1)
    served.stop()
    raise RuntimeError(f"tribune serve not ready after {timeout}s:\n{''.join(served.lines)[-5000:]}")
