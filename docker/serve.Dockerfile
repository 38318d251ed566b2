# syntax=docker/dockerfile:1
# CPU fallback for the Triton Deployments: `tribune serve` runs the same exported model
# repository in a real Triton Inference Server started through PyTriton, with ONNX Runtime
# on CPU, on the same ports (HTTP 8000, gRPC 8001, metrics 8002) and health endpoints as the
# stock NGC image. For clusters without GPUs (kind, minikube, CI): k8s/overlays/cpu.
#
#   docker build -f docker/serve.Dockerfile -t REGISTRY/tribune/serve:0.1.0 .
#
# The nvidia-pytriton wheel needs glibc >= 2.35 (Debian bookworm has 2.36) and a shared
# libpython (the python images ship one).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf \
    PYTRITON_HOME=/tmp/pytriton

RUN groupadd --system --gid 10001 tribune \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin tribune

WORKDIR /opt/tribune
COPY pyproject.toml README.md constraints.txt ./
COPY trainer ./trainer
COPY services ./services
COPY protos ./protos
# the [serve] extra (PyTriton, ONNX Runtime and the gateway; no torch: serving runs the ONNX
# graphs), at the versions CI tested (constraints.txt)
RUN pip install -c constraints.txt ".[serve]" \
 && python -m compileall -q "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && tribune serve --help > /dev/null

COPY --chmod=0755 docker/tribune-init.py /usr/local/bin/tribune-init

USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 8001 8002
# PID 1 reaps the tritonserver and Python-backend processes PyTriton starts
ENTRYPOINT ["tribune-init", "--"]
CMD ["tribune", "serve", "--repository", "/models", "--host", "0.0.0.0", "--grpc-port", "8001", "--http-port", "8000", "--metrics-port", "8002"]
