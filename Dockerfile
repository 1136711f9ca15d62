# syntax=docker/dockerfile:1
#
# One image for every fanout process: `fanout node`, `fanout worker`, `fanout migrate`.
# The Kubernetes manifests in k8s/ pick the role with the container's args.
#
#   docker build -t fanout:0.1.0 .
#   docker run --rm -p 8080:8080 -e FANOUT_JWT_SECRET=... fanout:0.1.0      # a node
#   docker run --rm fanout:0.1.0 worker --port 9090                        # a worker
#
# Pin the base by digest in a release pipeline (python:3.11-slim@sha256:...).
ARG PYTHON_IMAGE=python:3.11-slim

# --- build: a virtualenv holding the project and its pinned dependencies --------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/fanout

WORKDIR /src
# pyproject.toml pins every direct dependency (==) and the build backend; README.md is
# the package's long description, so setuptools needs it to build the wheel.
COPY pyproject.toml README.md ./
COPY common ./common
COPY node ./node
COPY worker ./worker

# Build the project's wheel, then install it with its pinned runtime dependencies only
# (no `dev` or `embedded` extras: Redis and Postgres are separate services here).
# --only-binary keeps compilers out: every dependency ships manylinux wheels. pip and
# setuptools leave the virtualenv afterwards: nothing runs them at run time.
RUN /opt/fanout/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/fanout/bin/pip install --only-binary=:all: /wheels/fanout-*.whl \
    && /opt/fanout/bin/pip uninstall --yes pip setuptools

# --- runtime: the virtualenv on a clean base, run as an unprivileged user --------------
FROM ${PYTHON_IMAGE}

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="fanout" \
      org.opencontainers.image.description="Real-time messaging backend: WebSocket nodes and conversation workers" \
      org.opencontainers.image.version="${VERSION}"

# A fixed numeric UID/GID: Kubernetes' runAsNonRoot can only verify a numeric USER, and
# the manifests' securityContext (runAsUser/runAsGroup 10001) names the same ids.
RUN groupadd --system --gid 10001 fanout \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin fanout

COPY --from=build /opt/fanout /opt/fanout

# Bytecode was compiled at install time; the root filesystem may be read-only at run time.
ENV PATH=/opt/fanout/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /tmp
USER 10001:10001

# 8080: node WebSocket/HTTP (`fanout node --port`); 9090: worker probes and metrics
# (`fanout worker --port`). A node must listen on 0.0.0.0 in a container (the CLI's
# default host is 127.0.0.1, right for a laptop, unreachable from outside a container).
EXPOSE 8080 9090

# No HEALTHCHECK: the image runs both roles on different ports, and Kubernetes uses its
# own probes (k8s/); `docker run` users can probe /healthz on the port they chose.
#
# fanout is PID 1 and handles SIGTERM itself (a graceful drain, SPEC §7); nodes and
# workers start no child processes, so no init process is needed to reap zombies.
ENTRYPOINT ["fanout"]
CMD ["node", "--host", "0.0.0.0", "--port", "8080"]
