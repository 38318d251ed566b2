"""Starting and stopping real servers for tests: free ports, readiness, clean shutdown."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    """A `tribune serve` child process and its ports."""
    proc: subprocess.Popen
    grpc_port: int
    http_port: int
    metrics_port: int
    lines: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _pump(stream, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


def start_serve(repo: Path, *extra: str, ports: tuple[int, int, int] | None = None, ready: str = "tribune serve: ready",
                timeout: float = 180) -> Served:
    grpc, http, metrics = ports or (free_port(), free_port(), free_port())
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer", "serve", "--repository", str(repo), "--grpc-port", str(grpc),
         "--http-port", str(http), "--metrics-port", str(metrics), "--intra-op-threads", "1", *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    served = Served(proc, grpc, http, metrics)
    threading.Thread(target=_pump, args=(proc.stdout, served.lines), daemon=True).start()
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(ready in l for l in served.lines):
            return served
        if proc.poll() is not None:
            time.sleep(0.2)
            raise RuntimeError(f"tribune serve exited with {proc.returncode}:\n{''.join(served.lines)[-5000:]}")
        time.sleep(0.1)
    served.stop()
    raise RuntimeError(f"tribune serve not ready after {timeout}s:\n{''.join(served.lines)[-5000:]}")
