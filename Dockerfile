# syntax=docker/dockerfile:1
# The agent identity broker: `broker serve` as a non-root user. No secrets in the image:
# configuration, policies, signing keys and secret references are mounted at run time
# (docker-compose.yml shows one way).

# ---- build: wheels for the package with its `server` extra (compilers stay in this stage) ----
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# python3-saml's xmlsec binding builds against libxmlsec1 where no binary wheel fits the platform.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config libxml2-dev \
      libxmlsec1-dev libxmlsec1-openssl \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY broker ./broker
COPY idp_adapters ./idp_adapters
COPY secret_backends ./secret_backends
RUN pip wheel --wheel-dir /wheels '.[server]'

# ---- runtime ----
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# xmlsec1 runtime libraries for python3-saml (SAML signature verification).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libxml2 libxmlsec1 libxmlsec1-openssl \
 && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels 'agent-identity-broker[server]'
# A fixed uid, so volumes prepared by the stack's init service can be handed to it.
RUN groupadd --system --gid 10001 broker \
 && useradd --system --uid 10001 --gid broker --home-dir /var/lib/broker --shell /usr/sbin/nologin broker \
 && mkdir -p /etc/broker /var/lib/broker/keys /var/log/broker \
 && chown -R broker:broker /var/lib/broker /var/log/broker
USER broker
WORKDIR /var/lib/broker
EXPOSE 8080
# Liveness: `broker healthcheck` reads the same configuration as `broker serve` (port, and HTTPS
# with the broker's own certificate pinned when http.tls_cert_file is set) and probes /healthz.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["broker", "healthcheck", "--config", "/etc/broker/broker.yaml"]
ENTRYPOINT ["broker"]
CMD ["serve", "--config", "/etc/broker/broker.yaml"]
