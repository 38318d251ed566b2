"""The distribution: one import package, extras per role, and constraints.txt pinning them.

The [gateway] install into a fresh virtual environment, and the gateway it starts, are tested in
tests/test_gateway.py (it needs the served models); `make install` itself is the fresh install
of .[dev], which holds [train] and [serve]."""
import json
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from tests.conftest import REPO, copy_source

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
SELF = PYPROJECT["project"]["name"]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    return pins


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _requirements(extra: str) -> dict[str, Requirement]:
    """An extra's requirements, the extras it names of this project expanded, by canonical name."""
    out = {}
    for text in [*(PYPROJECT["project"]["dependencies"] if extra == "" else []), *EXTRAS.get(extra, [])]:
        req = Requirement(text)
        if _canonical(req.name) == SELF:
            for inner in req.extras:
                out.update(_requirements(inner))
        else:
            out[_canonical(req.name)] = req
    return out


def test_the_distribution_name_is_not_the_taken_one_and_the_script_stays():
    assert SELF == "tribune-rlhf"            # `tribune` on PyPI is another project
    assert PYPROJECT["project"]["scripts"] == {"tribune": "tribune.trainer.cli:main"}
    assert all(p == "tribune" or p.startswith("tribune.") for p in PYPROJECT["tool"]["setuptools"]["packages"])


def test_every_requirement_of_every_extra_is_pinned_inside_its_range():
    pins = _pins()
    for extra in ["", *EXTRAS]:
        for name, req in _requirements(extra).items():
            assert name in pins, f"[{extra}] needs {name}: not in constraints.txt (make lock)"
            assert req.specifier.contains(pins[name], prereleases=True), \
                f"constraints.txt pins {name}=={pins[name]} outside [{extra}]'s {req.specifier}"


def test_the_roles_pull_only_what_they_need():
    gateway, serve, train, gpu = (set(_requirements(e)) | set(_requirements("")) for e in
                                  ("gateway", "serve", "train", "gpu"))
    assert not gateway & {"torch", "nvidia-pytriton", "onnxruntime", "onnxruntime-gpu", "accelerate"}
    assert "torch" not in serve, "serving runs ONNX graphs: no torch"
    assert "nvidia-pytriton" not in train, "the trainer talks to remote scorers"
    # [gpu] is [train] and [serve] with onnxruntime-gpu in place of onnxruntime (one module, two wheels)
    assert gpu == (train | serve) - {"onnxruntime"} | {"onnxruntime-gpu"}


@pytest.mark.slow
def test_the_gpu_extra_resolves_at_the_pinned_versions_without_onnxruntime(tmp_path):
    """pip resolves `.[gpu]` against constraints.txt (nothing is installed): onnxruntime-gpu in
    place of onnxruntime, and every package it would install is pinned."""
    src = copy_source(tmp_path / "src")
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
                           "--report", str(report), "-c", "constraints.txt", ".[gpu]"], cwd=src,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {_canonical(i["metadata"]["name"]): i["metadata"]["version"].split("+")[0]
           for i in json.loads(report.read_text())["install"]}
    assert {"onnxruntime-gpu", "torch", "nvidia-pytriton", "accelerate"} <= set(got)
    assert "onnxruntime" not in got
    pins = _pins()
    unpinned = {n: v for n, v in got.items() if n != SELF and pins.get(n) != v}
    assert not unpinned, f"resolved off constraints.txt: {unpinned}"
