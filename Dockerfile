# vat-job for NVIDIA GPU nodes (falls back to the CPU when no GPU is visible).
# The pinned torch wheel from PyPI is the CUDA build and carries its CUDA libraries, so the image needs no
# CUDA base image: the NVIDIA container toolkit (docker run --gpus all / the Kubernetes device plugin)
# mounts the driver.
#
#   docker build -t vat-job .                                  # MNIST mounted at run time (or downloaded)
#   docker build --build-arg BAKE_MNIST=true --build-arg VAT_DATA_DIR=/opt/mnist -t vat-job .
#                                                              # MNIST baked in, for clusters without egress
# Optional, for builds behind a TLS-intercepting proxy or with a local wheel directory (both do nothing when
# not given; .ci/container-setup uses them):
#   --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt      a CA bundle for pip (and the MNIST download)
#   --network host --build-arg WHEELS_URL=http://127.0.0.1:8000/      an extra pip --find-links location

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# The dependencies from the lock file alone (.ci/lock writes it from pyproject.toml): every version pinned, every
# file checked against its sha256, nothing resolved at build time; the layer that holds torch is reused until the
# lock file changes.
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
ARG WHEELS_URL=
COPY lock/image.txt /tmp/requirements.txt
# Dependencies, then what is free to cut: the tests shipped inside wheels and pip's byte code, replaced by byte
# code compiled once for every module (unchecked-hash: valid whatever the files' times; the root filesystem may
# be read-only, so nothing could be cached at run time). torch ships one Python 3.12-only test helper.
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && pip install --no-cache-dir --no-compile --require-hashes --no-deps ${WHEELS_URL:+--find-links "$WHEELS_URL"} \
        -r /tmp/requirements.txt \
    && find /opt/venv/lib -depth -type d \( -name __pycache__ -o -name tests -path '*/site-packages/*/tests' \) \
        -exec rm -rf {} + \
    && python -m compileall -q -j 0 --invalidation-mode unchecked-hash -x '/py312_intrinsics\.py$' /opt/venv/lib

# The project on top, built by the locked setuptools already in the venv (no build isolation: nothing fetched
# unpinned); only the files this step adds go to /stage, so that the image's 6 GB layer of dependencies is shared
# by every build of the same lock file (a code change adds kilobytes, not GBs).
FROM deps AS app
WORKDIR /src
COPY pyproject.toml README.md ./
COPY job ./job
RUN touch /tmp/before && pip install --no-cache-dir --no-deps --no-build-isolation --no-compile . \
    && python -m compileall -q --invalidation-mode unchecked-hash "$(python -c 'import job, os; print(os.path.dirname(job.__file__))')" \
    && mkdir /stage && find /opt/venv -type f -cnewer /tmp/before -exec cp --parents {} /stage/ \;

ARG BAKE_MNIST=false
RUN --mount=type=secret,id=pip_cert \
    mkdir -p /opt/mnist && if [ "$BAKE_MNIST" = "true" ]; then \
      if [ -s /run/secrets/pip_cert ]; then export SSL_CERT_FILE=/run/secrets/pip_cert; fi; \
      python -c "from job.data import ensure_mnist; from job.settings import Settings; ensure_mnist('/opt/mnist', Settings(_env_file=None).mnist_mirrors)"; \
    fi

FROM ${PYTHON_IMAGE}
# Where the job looks for MNIST: /data (a mounted volume) by default, /opt/mnist for a baked image.
ARG VAT_DATA_DIR=/data
LABEL org.opencontainers.image.title="vat-job" \
      org.opencontainers.image.description="MNIST with 100 labels: VAT and a labelled-only baseline, results to S3"
# A numeric UID/GID (Kubernetes' runAsNonRoot can verify it); k8s/ manifests use the same numbers. Any other
# UID works too (docker run --user "$(id -u):$(id -g)"): /data and /output are writable by anyone (sticky, like
# /tmp), so their anonymous volumes work for any user; mounted folders keep their own owner.
RUN groupadd --gid 10001 vat && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp vat \
    && mkdir -p /data /output /opt/mnist && chown 10001:10001 /data /output && chmod 1777 /data /output
COPY --from=deps /opt/venv /opt/venv
COPY --from=app /stage/ /
COPY --from=app --chown=10001:10001 /opt/mnist /opt/mnist
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
