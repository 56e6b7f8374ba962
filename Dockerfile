# One gateway instance. compose.yaml runs three of these behind HAProxy.
#
#   docker build -t pgleader .
#   docker run -e PGLEADER_DSN=... -e PGLEADER_WEBHOOK_SECRET=... -p 8080:8080 pgleader
#
# The image has no PostgreSQL of its own: give it PGLEADER_DSN (the embedded
# server of a bare `pgleader serve` is for a developer's machine).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# What the wheel is built from (pyproject.toml force-includes sql/, README.md is its readme).
COPY pyproject.toml README.md ./
COPY pgleader ./pgleader
COPY service ./service
COPY sql ./sql
# The redis extra too: PGLEADER_REDIS_URL works in the image (unset, it is never imported).
RUN pip install '.[redis]' && rm -rf /src

# Never run as root. The data directory belongs to the service user before a
# volume is mounted on it, so a fresh named volume inherits that ownership.
RUN useradd --system --uid 10001 --home-dir /var/lib/pgleader --shell /usr/sbin/nologin pgleader \
    && install -d -o pgleader -g pgleader -m 0750 /var/lib/pgleader
USER pgleader
WORKDIR /var/lib/pgleader

# Listen on every interface of the container (the CLI's default is loopback);
# the outage spool lives under the data directory, which must be a volume.
ENV PGLEADER_HOST=0.0.0.0 \
    PGLEADER_PORT=8080 \
    PGLEADER_OPERATOR_HOST=0.0.0.0 \
    PGLEADER_OPERATOR_PORT=9080 \
    PGLEADER_DATA_DIR=/var/lib/pgleader \
    PGLEADER_LOG_FORMAT=json
# 8080: the public listener (webhook, health, ready); 9080: the operator's
# (signals, coordinator, metrics): publish it to no one but the operator's network.
EXPOSE 8080 9080

# Liveness only: /ready (can take traffic) is for the load balancer. Asked on the
# operator's listener, which the source allow-list of the public one does not
# cover. No curl in the slim image, so Python asks; urlopen raises (exit 1) on
# any non-2xx answer.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PGLEADER_OPERATOR_PORT', '9080'), timeout=2)"]

# pgleader handles SIGTERM itself: /ready turns 503, in-flight requests finish
# (up to 30 s), leadership is resigned, exit 0. Give it a stop timeout above 30 s.
ENTRYPOINT ["pgleader"]
CMD ["serve"]
