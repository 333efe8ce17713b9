#!/usr/bin/env bash
# Brings compose/cluster.yml up on this Docker engine and checks that it works:
#   1. the three NATS nodes form one JetStream cluster (each node's /jsz sees a
#      meta leader and 3 peers);
#   2. the log (CADDY_FLEET) and the server's ingest stream are at 3 replicas,
#      every replica current;
#   3. a labeled container started on the host is served through that Caddy;
#   4. with the log's leader node stopped, the log gets a new leader, the first
#      site is still served, and a new labeled container still gets routed.
# Then it removes everything it made (containers, networks, volumes), also when
# a check fails. It prints each check as it passes; it exits non-zero on the
# first one that fails, with the caddy-fleet logs.
#
#   bash compose/cluster-check.sh
#
# Images are the offline ones (compose/build-offline-images.sh; the first run
# makes a release build of caddy-fleet, about 3 minutes): set NATS_IMAGE,
# CADDY_IMAGE, CADDY_FLEET_IMAGE (default caddy-fleet:local) or WHOAMI_IMAGE
# to use others. Needs docker-compose 1.29, curl and jq. Everything it makes
# is named after a unique compose project (cfcheck<pid><time>), so it can run
# beside anything else on the engine.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
export NATS_IMAGE="${NATS_IMAGE:-caddy-fleet-test/nats:2.15.1}"
export CADDY_IMAGE="${CADDY_IMAGE:-caddy-fleet-test/caddy:2.11.7}"
export CADDY_FLEET_IMAGE="${CADDY_FLEET_IMAGE:-caddy-fleet:local}"
whoami_image="${WHOAMI_IMAGE:-caddy-fleet-demo/whoami:local}"
bash "$here/build-offline-images.sh"

id="cfcheck$$$(date +%s)"
export NATS_CLUSTER_PASSWORD="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export NATS_APPLIER_PASSWORD="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export NATS_AGENT1_PASSWORD="$id-agent1" NATS_AGENT2_PASSWORD="$id-agent2"
export DOCKER_GID="$(stat -c %g /var/run/docker.sock)"
# Its own Docker network for the proxied containers, and only the containers
# carrying this run's label are published (the engine may run anything else).
export FLEET_NETWORK="$id-fleet" SERVER_FILTER_LABEL="cluster-check=$id"
compose() { docker-compose --log-level ERROR -p "$id" -f cluster.yml "$@"; }
started=()

cleanup() {
  local status=$?
  if [ "$status" -ne 0 ]; then
    echo "--- caddy-fleet's last log lines:" >&2
    compose logs --no-color --tail 40 caddy-fleet >&2 || true
  fi
  [ ${#started[@]} -gt 0 ] && docker rm -f -v "${started[@]}" >/dev/null 2>&1 || true
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  echo "cluster-check: removed project $id (containers, networks, volumes)"
  exit "$status"
}
trap cleanup EXIT

fail() { echo "cluster-check: FAILED: $*" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# until_ok SECONDS WHAT COMMAND…: runs COMMAND every half second until it succeeds.
until_ok() {
  local seconds="$1" what="$2"; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt "$deadline" ] || fail "$what (not within ${seconds} s)"
    sleep 0.5
  done
}

# Host ports: free a moment ago; another process can take one first, so a
# failed start is retried with new ports.
for attempt in 1 2 3; do
  export HTTP_PORT="$(free_port)" HTTPS_PORT="$(free_port)"
  export NATS1_PORT="$(free_port)" NATS2_PORT="$(free_port)" NATS3_PORT="$(free_port)"
  export NATS1_MONITOR_PORT="$(free_port)" NATS2_MONITOR_PORT="$(free_port)" NATS3_MONITOR_PORT="$(free_port)"
  if compose up -d; then break; fi
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  [ "$attempt" -lt 3 ] || fail "docker-compose up (3 attempts)"
  echo "cluster-check: docker-compose up failed (a host port taken?); again with other ports"
done
monitor_port() { case "$1" in nats1) echo "$NATS1_MONITOR_PORT" ;; nats2) echo "$NATS2_MONITOR_PORT" ;; nats3) echo "$NATS3_MONITOR_PORT" ;; esac; }
jsz() { curl -fsS --max-time 3 "http://127.0.0.1:$(monitor_port "$1")/jsz?$2"; }
begin=$SECONDS

# 1. One cluster: every node sees a meta leader and three peers.
cluster_formed() {
  local node
  for node in nats1 nats2 nats3; do
    jsz "$node" "" | jq -e '.meta_cluster.leader != null and .meta_cluster.leader != "" and .meta_cluster.cluster_size == 3' || return 1
  done
}
until_ok 90 "the three NATS nodes to form a JetStream cluster" cluster_formed
echo "cluster-check: ok: nats1, nats2, nats3 form one JetStream cluster (meta leader $(jsz nats1 "" | jq -r .meta_cluster.leader)) after $((SECONDS - begin)) s"

# 2. The log and the server's ingest stream at R3, every replica current.
# stream_state NODE STREAM: "<leader> <replicas> <current followers>".
stream_state() {
  jsz "$1" "accounts=true&streams=true&config=true" | jq -r --arg s "$2" '
    [.account_details[]?.stream_detail[]? | select(.name == $s)][0]
    | "\(.cluster.leader) \(.config.num_replicas) \([.cluster.replicas[]? | select(.current)] | length)"'
}
at_r3() {
  local node leader replicas current
  for node in nats1 nats2 nats3; do
    read -r leader replicas current < <(stream_state "$node" "$1" 2>/dev/null) || continue
    [ "$replicas" = 3 ] && [ "$current" = 2 ] && [ "$leader" != null ] && return 0
  done
  return 1
}
until_ok 90 "the log CADDY_FLEET at 3 replicas, all current" at_r3 CADDY_FLEET
until_ok 90 "the server's ingest stream at 3 replicas, all current" at_r3 CADDY_FLEET_IN_server
leader_of() {
  local node leader rest
  for node in nats1 nats2 nats3; do
    read -r leader rest < <(stream_state "$node" "$1" 2>/dev/null) || continue
    [ -n "$leader" ] && [ "$leader" != null ] && { echo "$leader"; return 0; }
  done
  return 1
}
log_leader="$(leader_of CADDY_FLEET)"
echo "cluster-check: ok: CADDY_FLEET and CADDY_FLEET_IN_server have 3 replicas, all current (log leader $log_leader)"

# 3. A labeled container on the fleet network is served through Caddy.
backend() { # backend NAME: starts a labeled whoami answering "Hostname: NAME".
  docker run -d --name "$id-$1" --hostname "$1" --network "$FLEET_NETWORK" \
    --label "cluster-check=$id" --label "caddy=http://$1.localhost" \
    --label 'caddy.reverse_proxy={{upstreams 80}}' "$whoami_image" >/dev/null
  started+=("$id-$1")
}
serves() { curl -fsS --max-time 3 -H "Host: $1.localhost" "http://127.0.0.1:$HTTP_PORT/" | grep -q "Hostname: $1"; }
first="one-$id"
t=$SECONDS
backend "$first"
until_ok 90 "$first.localhost to be served through Caddy" serves "$first"
echo "cluster-check: ok: a labeled container ($first.localhost) is served through Caddy $((SECONDS - t)) s after it started"

# 4. The log's leader node stopped: a new leader, and routing goes on.
t=$SECONDS
compose stop -t 2 "$log_leader" >/dev/null 2>&1 || fail "stop $log_leader"
new_leader() { local l; l="$(leader_of CADDY_FLEET)" && [ "$l" != "$log_leader" ]; }
until_ok 60 "the log to get a leader other than the stopped $log_leader" new_leader
echo "cluster-check: ok: $log_leader stopped; the log's new leader is $(leader_of CADDY_FLEET) after $((SECONDS - t)) s"
serves "$first" || fail "$first.localhost is no longer served with $log_leader stopped"
second="two-$id"
t=$SECONDS
backend "$second"
until_ok 90 "$second.localhost to be served with $log_leader stopped" serves "$second"
echo "cluster-check: ok: with $log_leader stopped, $first.localhost is still served and a new labeled container ($second.localhost) was routed $((SECONDS - t)) s after it started"
echo "cluster-check: all checks passed in $((SECONDS - begin)) s"
