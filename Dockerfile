# Remit: one image for every service (migrate, web, worker, beat, flower); the compose
# file picks the command. Each command is the same `./run.sh <service>` a developer runs.
FROM python:3.11.7-slim-bookworm AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # The image has its dependencies installed system-wide: run.sh must not build a venv.
    REMIT_USE_SYSTEM_PYTHON=1

WORKDIR /app

# Debian's PgBouncer: the same image runs `./run.sh pgbouncer` (docs/operations.md, PgBouncer).
RUN apt-get update \
    && apt-get install -y --no-install-recommends pgbouncer \
    && rm -rf /var/lib/apt/lists/*

# Dependencies first: this layer is rebuilt only when requirements.txt changes. The
# runtime only: tests, the bench and linting (requirements-dev.txt) stay out of the image.
COPY requirements.txt ./
RUN pip install --no-compile -r requirements.txt

RUN groupadd --system remit && useradd --system --gid remit --home-dir /app --no-create-home remit \
    && mkdir /app/.run && chown remit:remit /app/.run

COPY --chown=remit:remit alembic.ini pyproject.toml run.sh ./
COPY --chown=remit:remit common ./common
COPY --chown=remit:remit migrations ./migrations
COPY --chown=remit:remit ops ./ops
COPY --chown=remit:remit web ./web
COPY --chown=remit:remit worker ./worker

USER remit
EXPOSE 8000 5555

HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=2)"

CMD ["./run.sh", "web"]
