"""Process set-up shared by the servers: ONNX Runtime providers and the libpython path."""
from __future__ import annotations

import os
import sysconfig


def execution_providers() -> list[str]:
    """CUDA when onnxruntime-gpu sees a GPU, else CPU (always last, as the fallback)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = [p for p in ("CUDAExecutionProvider",) if p in available]
    return wanted + ["CPUExecutionProvider"]


def ensure_libpython_on_loader_path() -> None:
    """Puts this interpreter's LIBDIR first on LD_LIBRARY_PATH for Triton's child processes.

    PyTriton's Python-backend stub links libpython dynamically; under pyenv or conda it can
    otherwise load the system's libpython and fail at model load with
    "'_thread.RLock' object has no attribute '_recursion_count'". Triton is a child
    process, so setting the variable here, before it starts, is enough.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir:
        return
    parts = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *parts])
