"""Test helpers for real servers (the same launcher `tribune demo` uses)."""
from tribune.services.launcher import ServeProcess, free_port, start_serve as _start

__all__ = ["ServeProcess", "WITHOUT_TORCH", "free_port", "start_serve", "start_serves", "stop_serves"]


# the CLI with `import torch` failing, as in the serve and gateway images (which ship no torch)
WITHOUT_TORCH = ("import sys; sys.modules['torch'] = None; from tribune.trainer.cli import main; "
                 "sys.exit(main(sys.argv[1:]))")


def start_serve(repo, *extra, **kw) -> ServeProcess:
    """`tribune serve` with one ONNX Runtime thread per session: tests share 2 cores."""
    return _start(repo, "--intra-op-threads", "1", *extra, **kw)


def start_serves(repos, *extra, **kw) -> list[ServeProcess]:
    """Several `tribune serve`s started at once (each waits mostly on Triton, not on the CPU)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(repos)) as pool:
        futures = [pool.submit(start_serve, r, *extra, **kw) for r in repos]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        stop_serves([f.result() for f in futures if f.exception() is None])
        raise errors[0]
    return [f.result() for f in futures]


def stop_serves(servers) -> list[int]:
    """Stops them at once (Triton's shutdown takes seconds each); their exit codes."""
    from concurrent.futures import ThreadPoolExecutor

    if not servers:
        return []
    with ThreadPoolExecutor(len(servers)) as pool:
        return list(pool.map(lambda s: s.stop(), servers))
