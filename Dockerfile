# vat-job for NVIDIA GPU nodes (falls back to the CPU when no GPU is visible).
# The pinned torch wheel from PyPI is the CUDA build and carries its CUDA libraries, so the image needs no
# CUDA base image: the NVIDIA container toolkit (docker run --gpus all / the Kubernetes device plugin)
# mounts the driver.
#
#   docker build -t vat-job .                                  # MNIST mounted at run time (or downloaded)
#   docker build --build-arg BAKE_MNIST=true --build-arg VAT_DATA_DIR=/opt/mnist -t vat-job .
#                                                              # MNIST baked in, for clusters without egress

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first (one source of truth: pyproject.toml), so code changes do not re-download torch.
COPY pyproject.toml README.md ./
RUN mkdir job && touch job/__init__.py && pip install --no-cache-dir . && pip uninstall --yes vat-job
COPY job ./job
RUN pip install --no-cache-dir --no-deps . \
    && find /opt/venv -name '__pycache__' -type d -prune -exec rm -rf {} + \
    && python -m compileall -q /opt/venv/lib

ARG BAKE_MNIST=false
RUN mkdir -p /opt/mnist && if [ "$BAKE_MNIST" = "true" ]; then \
      python -c "from job.data import ensure_mnist; from job.settings import Settings; ensure_mnist('/opt/mnist', Settings(_env_file=None).mnist_mirrors)"; \
    fi

FROM ${PYTHON_IMAGE}
# Where the job looks for MNIST: /data (a mounted volume) by default, /opt/mnist for a baked image.
ARG VAT_DATA_DIR=/data
LABEL org.opencontainers.image.title="vat-job" \
      org.opencontainers.image.description="MNIST with 100 labels: VAT and a labelled-only baseline, results to S3"
# A numeric UID/GID (Kubernetes' runAsNonRoot can verify it); k8s/ manifests use the same numbers.
RUN groupadd --gid 10001 vat && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp vat \
    && mkdir -p /data /output /opt/mnist && chown 10001:10001 /data /output
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=10001:10001 /opt/mnist /opt/mnist
# Every path the job writes is a volume or /tmp, so a read-only root filesystem works.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/cache \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    VAT_DATA_DIR=${VAT_DATA_DIR} \
    VAT_OUTPUT_DIR=/output
VOLUME ["/data", "/output", "/tmp"]
WORKDIR /tmp
USER 10001:10001
# Exec form: the job is PID 1's only process and receives SIGTERM itself (checkpoint, upload, exit 5).
ENTRYPOINT ["vat-job"]
