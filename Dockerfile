# vhostd in a container. Minimal for now: the daemon and its Python dependencies.
#
#   docker build -t vhostd .
#   docker run --rm -v /run/vhostd:/run/vhostd -v /srv/images:/images vhostd \
#       --socket-path=/run/vhostd/disk0.sock --blk-file=/images/disk0.img
#
# QEMU on the host connects to the socket in the shared volume.
FROM debian:12-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/vhostd
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY vhostd ./vhostd
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir .

# SIGTERM ends vhostd quickly and cleanly, which is what `docker stop` sends.
ENTRYPOINT ["/opt/venv/bin/vhostd"]
CMD ["--help"]
