"""Test helpers for real servers (the same launcher `tribune demo` uses)."""
from services.launcher import ServeProcess, free_port, start_serve as _start

__all__ = ["ServeProcess", "free_port", "start_serve"]


def start_serve(repo, *extra, **kw) -> ServeProcess:
    """`tribune serve` with one ONNX Runtime thread per session: tests share 2 cores."""
    return _start(repo, "--intra-op-threads", "1", *extra, **kw)
