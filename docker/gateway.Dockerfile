# syntax=docker/dockerfile:1
# The text gateway: `tribune gateway` (gRPC tribune.v1.RewardService in front of Triton's
# `reward` model). CPU only: it tokenizes text and talks to Triton over gRPC.
#
#   docker build -f docker/gateway.Dockerfile -t REGISTRY/tribune/gateway:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
FROM ${PYTHON_IMAGE}

# No torch and no PyTriton: the gateway only tokenizes text (transformers' tokenizers, which
# need no torch) and talks gRPC to Triton. tests/test_gateway.py runs it with torch blocked.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf

RUN groupadd --system --gid 10001 tribune \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin tribune

WORKDIR /opt/tribune
COPY pyproject.toml README.md constraints.txt ./
COPY trainer ./trainer
COPY services ./services
COPY protos ./protos
# the [gateway] extra, at the versions CI tested (constraints.txt)
RUN pip install -c constraints.txt ".[gateway]" \
 && ! python -c "import torch" 2>/dev/null \
 && python -m compileall -q "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && tribune gateway --help > /dev/null

COPY --chmod=0755 docker/tribune-init.py /usr/local/bin/tribune-init

USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 9090
ENTRYPOINT ["tribune-init", "--"]
CMD ["tribune", "gateway", "--repository", "/models", "--triton-url", "tribune-reward:8001", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090"]
