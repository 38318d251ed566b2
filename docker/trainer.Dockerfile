# syntax=docker/dockerfile:1
# The PPO trainer image: `accelerate launch ... -m tribune.trainer ppo ...` on NVIDIA GPUs. It holds
# the whole project, so every `tribune` command (sft, train-rm, export, score) runs in it too.
#
#   docker build -f docker/trainer.Dockerfile -t REGISTRY/tribune/trainer:0.1.0 .
#
# The default PyPI torch wheels for Linux x86_64 bundle CUDA (they need only the NVIDIA driver
# on the node, which the GPU operator / device plugin provides). Pin a different build with
#   --build-arg TORCH_SPEC=torch==2.13.0 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf \
    MPLCONFIGDIR=/tmp/matplotlib

# an unprivileged user with a fixed uid/gid: the manifests run as 10001:10001
RUN groupadd --system --gid 10001 tribune \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin tribune

WORKDIR /opt/tribune
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

# the project, from this repository (non-editable install; tests, runs and venvs are excluded
# by .dockerignore)
COPY pyproject.toml README.md constraints.txt ./
COPY trainer ./trainer
COPY services ./services
COPY protos ./protos
# the [train] extra at the versions CI tested (constraints.txt; its torch pin matches the
# CUDA build installed above)
RUN pip install -c constraints.txt ".[train]" "${TORCH_SPEC}" \
 && python -m compileall -q "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && tribune --help > /dev/null \
 && accelerate launch --help > /dev/null

COPY --chmod=0755 docker/tribune-init.py /usr/local/bin/tribune-init

USER 10001:10001
WORKDIR /tmp
# PID 1 forwards SIGTERM to the launcher and to every rank, so a preempted pod checkpoints
ENTRYPOINT ["tribune-init", "--signal-descendants", "--"]
CMD ["tribune", "--help"]
