#!/usr/bin/env python3
"""PID 1 of the Tribune images: runs the command, forwards signals, reaps, waits for all.

Why not exec the command directly? `accelerate launch` with one process runs the trainer
as a child and does not pass SIGTERM on: as PID 1 it would die at once, the container
would end, and the kernel would SIGKILL the trainer in the middle of the checkpoint that
SIGTERM asked it to write. This init

* becomes a child subreaper, so processes orphaned by a dying launcher are re-parented to
  it instead of escaping the wait;
* forwards SIGTERM / SIGINT / SIGHUP / SIGQUIT / SIGUSR1 / SIGUSR2 to the command, and
  with ``--signal-descendants`` to every process below it (the trainer image: the
  launcher *and* the ranks it started get the signal, so each rank checkpoints);
* reaps zombies, and exits only when no descendant is left, with the command's status
  (128 + N when a signal N ended it), the way a shell reports it.

Usage: tribune-init [--signal-descendants] [--] COMMAND [ARG...]
Only the standard library; Linux only (prctl, /proc).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def set_subreaper() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    except (OSError, AttributeError) as e:  # still works as PID 1, where the kernel re-parents to us anyway
        print(f"tribune-init: cannot become a subreaper ({e}); orphans may escape the wait", file=sys.stderr)


def descendants(root: int) -> list[int]:
    """Every live process below ``root``, parents before children (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:   # exited meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        fields = stat[stat.rindex(b")") + 2:].split()
        if fields[0] == b"Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    order, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop(0)
        order.append(pid)
        todo.extend(children.get(pid, []))
    return order


def main(argv: list[str]) -> int:
    all_descendants = False
    while argv and argv[0].startswith("--"):
        flag = argv.pop(0)
        if flag == "--":
            break
        if flag == "--signal-descendants":
            all_descendants = True
        else:
            print(f"tribune-init: unknown option {flag}", file=sys.stderr)
            return 2
    if not argv:
        print("usage: tribune-init [--signal-descendants] [--] COMMAND [ARG...]", file=sys.stderr)
        return 2
    set_subreaper()
    try:
        child = subprocess.Popen(argv)
    except OSError as e:
        print(f"tribune-init: cannot run {argv[0]}: {e}", file=sys.stderr)
        return 127

    def forward(signum, _frame):
        targets = descendants(os.getpid()) if all_descendants else [child.pid]
        for pid in targets:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for sig in FORWARDED:
        signal.signal(sig, forward)

    status = None
    while True:
        try:
            pid, raw = os.wait()
        except ChildProcessError:   # nothing left below us
            break
        except InterruptedError:
            continue
        if pid == child.pid:
            status = raw
    if status is None:
        return 1
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
