# vhostd in containers: a small runtime image and a test image.
#
#   ./scripts/container build     # both images (podman or buildah, no Docker engine needed)
#   ./scripts/container test      # the test suite (without guests) inside the test image
#   ./scripts/container demo      # the live-migration demo inside the test image (TCG)
#
# BASE chooses the base image (default debian:12-slim); scripts/container makes one
# with mmdebstrap when it cannot be pulled. README.md, "Containers".
ARG BASE=debian:12-slim
# The CA bundle pip trusts; scripts/container mounts the host's bundle there when the host
# reaches PyPI through a proxy with its own certificate authority.
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt

# --- build: vhostd and its Python dependencies in a virtual environment ------------------
FROM ${BASE} AS build
ARG PIP_CERT
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY vhostd ./vhostd
RUN python3 -m venv /opt/vhostd && /opt/vhostd/bin/pip install --no-cache-dir .

# --- runtime: the daemon and its tools (vhostd, vhostd-admin, vhostd-migrate) ---------------
FROM ${BASE} AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --user-group --home-dir /nonexistent --shell /usr/sbin/nologin vhostd \
    && install -d -o vhostd -g vhostd -m 0755 /run/vhostd
COPY --from=build /opt/vhostd /opt/vhostd
ENV PATH=/opt/vhostd/bin:$PATH
USER vhostd
COPY contrib/container/healthcheck.py /usr/local/lib/vhostd/healthcheck.py
# Asks the daemon itself over its QMP control socket (--control-socket, which the
# command must pass): greeting, qmp_capabilities, then query-status must say running.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
    CMD ["python3", "/usr/local/lib/vhostd/healthcheck.py", "/run/vhostd/control.sock"]
# SIGTERM ends vhostd quickly and cleanly, which is what `podman stop` sends.
ENTRYPOINT ["/opt/vhostd/bin/vhostd"]
CMD ["--help"]

# --- test: QEMU, the guest harness, the tests and the demo ----------------------------------
FROM ${BASE} AS test
ARG PIP_CERT
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The Debian packages and .venv of ./scripts/install-deps, and the test guest built once
# (so the tests and the demo need no network).
RUN VHOSTD_DEPS=container ./scripts/install-deps \
    && .venv/bin/python -m testbed.guest \
    && rm -rf /var/lib/apt/lists/* /root/.cache/pip
ENTRYPOINT ["/src/scripts/container-entry"]
CMD ["test"]
