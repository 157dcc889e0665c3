# authz-server: the ext_authz server, its CLI, and the demo apps' echo upstream.
#
#   docker build -t authz-server:dev .
#   docker run --rm authz-server:dev --help
#
# Stage 1 builds a wheel (protos/ are compiled by setup.py with grpcio-tools, a build-time
# requirement only, and the C extension of the gRPC repeat key with gcc) with the tools pinned in
# requirements/build.lock; stage 2 installs it with exactly the runtime dependencies pinned in
# requirements/runtime.lock, and nothing else. --ignore-requires-python and overlay.lock (installed
# again last): see requirements/lock.py.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY requirements/build.lock ./requirements/
RUN pip install --require-hashes -r requirements/build.lock
COPY pyproject.toml setup.py README.md ./
COPY protos ./protos
COPY authz_server ./authz_server
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

FROM python:3.11-slim
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY requirements/runtime.lock requirements/overlay.lock /tmp/
COPY --from=build /wheels /wheels
RUN pip install --require-hashes --ignore-requires-python -r /tmp/runtime.lock \
    && pip install --require-hashes --no-deps --force-reinstall -r /tmp/overlay.lock \
    && pip install --no-deps /wheels/*.whl && rm -rf /wheels /tmp/runtime.lock /tmp/overlay.lock \
    && groupadd --system --gid 10001 authz \
    && useradd --system --uid 10001 --gid authz --home-dir /var/lib/authz --create-home --shell /usr/sbin/nologin authz \
    && mkdir -p /etc/authz \
    && chown authz:authz /var/lib/authz
USER 10001:10001
WORKDIR /var/lib/authz
# 9191 ext_authz gRPC (+ grpc.health.v1), 9192 Envoy HTTP ext_authz (when --http-addr), 9464 /metrics
EXPOSE 9191 9192 9464
ENTRYPOINT ["authz-server"]
CMD ["serve", "--config", "/etc/authz/config.yaml"]
