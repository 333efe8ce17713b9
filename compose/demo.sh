#!/usr/bin/env bash
# The multi-host demo on one Docker engine:
#   bash compose/demo.sh up [--port 8080]   start it, wait until routed, print curl lines
#   bash compose/demo.sh down               remove every container, network and volume it made
#
# A server host (Caddy, NATS, caddy-fleet server mode, whoami-server.localhost)
# and two simulated remote hosts: agent1 (whoami-remote1.localhost,
# alt-remote1.localhost) and agent2 (whoami-remote2.localhost, and a container
# asking for a site the policy does not grant it), each with its own
# caddy-fleet agent, NATS user and AGENT_FILTER_LABEL. The dashboard is at
# http://fleet.localhost:<port>/ (admin / demo). Images are built
# offline (compose/build-offline-images.sh) unless DEMO_IMAGES=official.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

port=80
command="${1:-}"
shift || true
while [ $# -gt 0 ]; do
  case "$1" in
    --port) port="$2"; shift 2 ;;
    *) echo "unknown option $1 (use --port N)" >&2; exit 2 ;;
  esac
done

compose() { docker-compose --log-level ERROR "$@"; }
server() { compose -p caddy-fleet-server -f server.yml -f demo/server.yml "$@"; }
agent() { # agent N compose-args…
  local n="$1"; shift
  AGENT_ID="agent$n" AGENT_FILTER_LABEL="agent=remote$n" NATS_URL=nats://nats:4222 \
  NATS_USER="agent$n" NATS_PASSWORD="demo-agent$n" \
    compose -p "caddy-fleet-agent$n" -f agent.yml -f demo/attach.yml -f "demo/remote$n.yml" "$@"
}

export NATS_APPLIER_PASSWORD=demo-applier NATS_AGENT1_PASSWORD=demo-agent1 NATS_AGENT2_PASSWORD=demo-agent2
export DOCKER_GID="$(stat -c %g /var/run/docker.sock)"
export HTTP_PORT="$port" HTTPS_PORT="${HTTPS_PORT:-8443}" NATS_PORT="${NATS_PORT:-4222}"
export SERVER_FILTER_LABEL=agent=server
if [ "${DEMO_IMAGES:-offline}" = offline ]; then
  export CADDY_FLEET_IMAGE=caddy-fleet:local NATS_IMAGE=caddy-fleet-test/nats:2.15.1 \
         CADDY_IMAGE=caddy-fleet-test/caddy:2.11.7 WHOAMI_IMAGE=caddy-fleet-demo/whoami:local
fi

case "$command" in
  up)
    [ "${DEMO_IMAGES:-offline}" = offline ] && bash "$here/build-offline-images.sh"
    server up -d
    gateway="$(docker network inspect caddy-fleet -f '{{(index .IPAM.Config 0).Gateway}}')"
    for n in 1 2; do HOST_IP="$gateway" DEMO_BIND_IP="$gateway" agent "$n" up -d; done
    echo "waiting for the four sites to be routed…"
    deadline=$((SECONDS + 120))
    for host in whoami-server whoami-remote1 alt-remote1 whoami-remote2; do
      until curl -fsS -H "Host: $host.localhost" "http://127.0.0.1:$port/" 2>/dev/null | grep -q "Hostname: $host"; do
        if [ $SECONDS -ge $deadline ]; then
          echo "$host.localhost is not routed after 120 s; see: docker-compose -p caddy-fleet-server -f compose/server.yml logs caddy-fleet" >&2
          exit 1
        fi
        sleep 1
      done
      echo "  $host.localhost routed"
    done
    echo
    echo "Try:"
    for host in whoami-server whoami-remote1 alt-remote1 whoami-remote2; do
      echo "  curl -H \"Host: $host.localhost\" http://localhost:$port"
    done
    echo
    echo "The dashboard (user admin, password demo): http://fleet.localhost:$port/"
    echo "  (a browser resolves *.localhost itself; curl: curl -u admin:demo -H \"Host: fleet.localhost\" http://localhost:$port/)"
    echo
    echo "Stop with: bash compose/demo.sh down"
    ;;
  down)
    for n in 1 2; do HOST_IP= DEMO_BIND_IP=127.0.0.1 agent "$n" down -v --remove-orphans; done
    server down -v --remove-orphans
    ;;
  *)
    echo "usage: bash compose/demo.sh up [--port N] | down" >&2
    exit 2
    ;;
esac
