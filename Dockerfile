# escrow-stream: the worker, the outbox publisher and the operator commands in one image.
#
#   make image                       # docker or podman, tagged escrow-stream:<version>
#   docker run --rm escrow-stream:0.1.0 --help
#   docker run -d -p 3000:3000 -v escrow-data:/var/lib/escrow-stream --env-file .env \
#       escrow-stream:0.1.0                      # the worker (the default command)
#   docker run --rm --env-file .env escrow-stream:0.1.0 db migrate
#   docker run --rm --env-file .env escrow-stream:0.1.0 topics create
#   docker run -d --env-file .env escrow-stream:0.1.0 outbox-publisher
#
# BASE_IMAGE must be a Debian-like image with Python 3.11 as `python3` (with its `venv` module)
# and `useradd`; scripts/image-local.sh makes one with debootstrap where no registry is reachable.
# RocksDB needs nothing from the system: the `rocksdict` wheel (faust-streaming[rocksdict])
# carries RocksDB itself and links only glibc, libstdc++ and libgcc_s, which the base has.
ARG BASE_IMAGE=python:3.11-slim

# -- 1. build: a wheelhouse of the dependencies, then the project's wheel -------------------
FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/build
WORKDIR /src
# The dependencies first, from pyproject.toml alone: their layer stays cached while only the
# code changes.
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > requirements.txt \
    && /opt/build/bin/pip wheel --wheel-dir /wheels -r requirements.txt
COPY README.md ./
COPY escrow_stream ./escrow_stream
RUN /opt/build/bin/pip wheel --no-deps --wheel-dir /wheels .

# -- 2. install: the wheel into a venv, from the wheelhouse alone (no index: the wheel's own
#       dependency metadata decides what is installed, no compiler needed) --------------------
FROM ${BASE_IMAGE} AS install
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_CACHE_DIR=1
COPY --from=build /wheels /wheels
RUN python3 -m venv /opt/escrow-stream \
    && /opt/escrow-stream/bin/pip install --no-index --find-links /wheels escrow-stream \
    && /opt/escrow-stream/bin/escrow-stream --help >/dev/null

# -- 3. runtime: the venv (same base, same path: it runs as installed), a user, no wheels ----
FROM ${BASE_IMAGE} AS runtime
COPY --from=install /opt/escrow-stream /opt/escrow-stream

# A fixed uid/gid, so volumes and Kubernetes' runAsUser/fsGroup can name it.
RUN groupadd --gid 10001 escrow \
    && useradd --uid 10001 --gid escrow --create-home --home-dir /home/escrow \
       --shell /usr/sbin/nologin escrow \
    && mkdir -p /var/lib/escrow-stream \
    && chown escrow:escrow /var/lib/escrow-stream

# DATA_DIR holds the RocksDB tables: rebuilt from the changelog topics when lost, but a kept
# volume makes a restart a short catch-up instead of a full recovery.
ENV PATH=/opt/escrow-stream/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    DATA_DIR=/var/lib/escrow-stream \
    PORT=3000 \
    WEB_HOST=0.0.0.0
VOLUME ["/var/lib/escrow-stream"]
WORKDIR /home/escrow
USER escrow:escrow
EXPOSE 3000

# The worker (PID 1's command, or tini's child's with --init): GET /health on PORT, 200 while
# processing, 503 when stalled.  The outbox publisher has no web server: with METRICS_ENABLED
# its METRICS_PORT must answer, otherwise its process being there is all there is to check.
# One-shot commands (db migrate, topics create) pass.  Python's urllib: the image needs no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 CMD ["python3", "-c", \
    "import os, urllib.request as u; \
    argv = open('/proc/1/cmdline', 'rb').read().split(bytes(1)); \
    env = os.environ.get; \
    metrics = env('METRICS_ENABLED', '').lower() in ('1', 'true', 'yes', 'on'); \
    url = ('http://127.0.0.1:%s/health' % env('PORT', '3000') if b'worker' in argv \
        else 'http://127.0.0.1:%s/metrics' % env('METRICS_PORT', '9090') \
        if b'outbox-publisher' in argv and metrics else None); \
    url and u.urlopen(url, timeout=4).close()"]

# Faust leaves its consumer group cleanly on SIGTERM: give it the time (compose
# stop_grace_period, Kubernetes terminationGracePeriodSeconds) rather than SIGKILL.
STOPSIGNAL SIGTERM

# Last, so that a new version or date rebuilds no layer but this one.
ARG VERSION=0.0.0+unknown
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="escrow-stream" \
      org.opencontainers.image.description="Escrow for marketplaces: holds a buyer's money until delivery, as a Faust stream-processing app." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="LicenseRef-Proprietary"

ENTRYPOINT ["escrow-stream"]
CMD ["worker"]
