# obd-autoconvert webhook service: `obd-webhook serve` (HTTP front end + conversion workers).
#
#   docker build -t obd-autoconvert .
#   docker run -d --stop-timeout 60 -p 8080:8080 -v obd-data:/data -e OBD_WEBHOOK_SECRETS=<secret> obd-autoconvert
#
# With podman, without Docker Hub (a debootstrapped base passed as PYTHON_IMAGE), and the flags some kernels
# need: README.md, "Run it in a container" (tests/test_container.py runs exactly those commands).
#
# Without OBD_WEBHOOK_SECRETS a secret is generated on first start, stored in /data and printed once
# (docker logs). Configuration: mount a YAML file and set OBD_WEBHOOK_CONFIG, or OBD_WEBHOOK_* variables
# (docs/webhook.md). `docker run --no-healthcheck ... obd-autoconvert worker` runs conversion workers only
# (they serve no HTTP, so the HEALTHCHECK below does not apply to them).
#
# Stopping: SIGTERM lets running conversions finish for shutdown_grace_seconds (30 s) and `serve` kills
# what is left 10 s later; docker's and podman's default stop timeout (10 s) would kill them first, so run
# with `--stop-timeout 60` (compose: stop_grace_period: 60s; Kubernetes: terminationGracePeriodSeconds: 60).
# A Dockerfile cannot set the stop timeout itself.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY converter ./converter
COPY webhook ./webhook
RUN python -m venv /opt/obd \
 && /opt/obd/bin/pip install --upgrade pip \
 && /opt/obd/bin/pip install .

FROM ${PYTHON_IMAGE}
ARG UID=10001
RUN groupadd --system --gid ${UID} obd \
 && useradd --system --uid ${UID} --gid obd --home-dir /data --shell /usr/sbin/nologin obd \
 && mkdir -p /data && chown obd:obd /data
COPY --from=build /opt/obd /opt/obd
COPY gunicorn.conf.py /opt/obd/gunicorn.conf.py
ENV PATH=/opt/obd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OBD_WEBHOOK_DATA_DIR=/data \
    OBD_WEBHOOK_LISTEN=0.0.0.0:8080 \
    OBD_WEBHOOK_LOG_FORMAT=json
USER obd
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080
# /healthz needs no secret; python is the only HTTP client in the slim image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; port = os.environ['OBD_WEBHOOK_LISTEN'].rsplit(':', 1)[1]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
# serve forwards SIGTERM to gunicorn and the workers and waits for running conversions (grace period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["obd-webhook"]
CMD ["serve"]
