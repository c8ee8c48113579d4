#!/usr/bin/env bash
# The image where no registry of images is reachable: a Debian base made with debootstrap
# stands in for python:3.11-slim, and podman builds our Dockerfile on it.
#
#   scripts/image-local.sh base     the base image (debootstrap + podman import), once
#   scripts/image-local.sh build    base if missing, then the image: escrow-stream:<version>
#   scripts/image-local.sh smoke    build, then run the image against the local stack:
#                                   `db status`, `topics create`, the worker until /health and
#                                   /ready answer 200 and the image's HEALTHCHECK passes, then
#                                   `podman stop`, which must end in exit code 0
#
# Needs root and Debian's podman, runc and debootstrap (installed with apt-get when missing).
# The base is Debian bookworm (python3.11, as the image's python:3.11-slim); it takes the
# host's CA bundle, so that pip inside the build trusts what the host's pip trusts.
#
# Environment: BASE_IMAGE (localhost/escrow-base:bookworm), IMAGE_NAME (escrow-stream),
# DEBIAN_MIRROR (http://deb.debian.org/debian), PODMAN_RUNTIME (runc:
# crun 1.8 refuses this kind of host's hybrid cgroups), IMAGE_WORK (.stack/image), and for
# smoke the harness's variables: TEST_KAFKA_BROKERS, TEST_DATABASE_URL, TEST_REDIS_URL.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${BASE_IMAGE:-localhost/escrow-base:bookworm}
IMAGE_NAME=${IMAGE_NAME:-escrow-stream}
PODMAN_RUNTIME=${PODMAN_RUNTIME:-runc}
IMAGE_WORK=${IMAGE_WORK:-.stack/image}
SUITE=bookworm
HEALTH_WAIT_S=${HEALTH_WAIT_S:-120}

log() { echo "image-local: $*" >&2; }
die() { log "$*"; exit 1; }

# podman's defaults raise RLIMIT_NOFILE/NPROC above what a process here may set (no
# CAP_SYS_RESOURCE): ask for the host's own limits, nproc no higher than pid_max.
limits() {
  local nproc pid_max
  nproc=$(ulimit -Hu)
  pid_max=$(cat /proc/sys/kernel/pid_max)
  if [ "$nproc" = unlimited ] || [ "$nproc" -gt "$pid_max" ]; then nproc=$pid_max; fi
  echo "--ulimit nofile=$(ulimit -Hn):$(ulimit -Hn) --ulimit nproc=$nproc:$nproc"
}

podman_() { podman --runtime "$PODMAN_RUNTIME" "$@"; }

need_tools() {
  local missing=()
  command -v podman >/dev/null || missing+=(podman)
  command -v "$PODMAN_RUNTIME" >/dev/null || missing+=("$PODMAN_RUNTIME")
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}: apt-get install ${missing[*]} (as root)"
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

mirror() { echo "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"; }

base() {
  need_tools
  local rootfs="$IMAGE_WORK/rootfs"
  rm -rf "$rootfs"
  mkdir -p "$IMAGE_WORK"
  log "debootstrap $SUITE into $rootfs from $(mirror)"
  # python3.11-venv depends on python3.11-distutils, which only python3-distutils provides:
  # debootstrap does not resolve Provides, so name it.
  debootstrap --variant=minbase --include=python3.11,python3.11-venv,python3-distutils \
    "$SUITE" "$rootfs" "$(mirror)" >"$IMAGE_WORK/debootstrap.log" 2>&1 \
    || die "debootstrap failed: see $IMAGE_WORK/debootstrap.log and $rootfs/debootstrap/debootstrap.log"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/debootstrap
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  log "podman import as $BASE_IMAGE"
  tar -C "$rootfs" --numeric-owner -c . | podman import \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
}

version() {
  python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])'
}

build() {
  need_tools
  mkdir -p "$IMAGE_WORK"  # its logs, also when the base image exists already
  podman image exists "$BASE_IMAGE" || base
  local v
  v=$(version)
  log "building $IMAGE_NAME:$v on $BASE_IMAGE"
  # shellcheck disable=SC2046  # limits() is a list of flags
  podman_ build --format docker --network host $(limits) \
    --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg VERSION="$v" \
    --build-arg REVISION="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    -t "$IMAGE_NAME:$v" -t "$IMAGE_NAME:latest" . >"$IMAGE_WORK/build.log" 2>&1 \
    || { tail -30 "$IMAGE_WORK/build.log" >&2; die "podman build failed: $IMAGE_WORK/build.log"; }
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

http_status() {
  python3 - "$1" <<'EOF'
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except OSError:
    print(0)
EOF
}

# The smoke run's topics (its own and Faust's changelog/repartition topics), best effort:
# with the repository's venv, where the broker answers.
delete_topics() {
  local run=$1
  [ -x .venv/bin/python ] || return 0
  .venv/bin/python - "$run" "${TEST_KAFKA_BROKERS:-127.0.0.1:9092}" <<'EOF' || true
import asyncio, sys
from aiokafka.admin import AIOKafkaAdminClient

async def main(run: str, brokers: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=brokers)
    await admin.start()
    try:
        ours = [t for t in await admin.list_topics() if t.startswith((f"{run}.", f"escrow-{run}-"))]
        if ours:
            await admin.delete_topics(ours)
    finally:
        await admin.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
EOF
}

SMOKE_NAME=
SMOKE_RUN=
smoke_cleanup() {
  [ -n "$SMOKE_NAME" ] && podman_ rm -f -v "$SMOKE_NAME" >/dev/null 2>&1
  [ -n "$SMOKE_RUN" ] && delete_topics "$SMOKE_RUN"
  return 0
}

smoke() {
  build
  local v run port name image
  v=$(version)
  image="$IMAGE_NAME:$v"
  run="t-$(python3 -c 'import uuid; print(uuid.uuid4().hex[:10])')"
  port=$(free_port)
  name="escrow-smoke-$run"
  # The harness's test deployment (tests/harness.py: stack_environ, Stack.create).
  local env=(
    -e NODE_ENV=test
    -e KAFKA_BROKERS="${TEST_KAFKA_BROKERS:-127.0.0.1:9092}"
    -e DATABASE_URL="${TEST_DATABASE_URL:-postgresql://escrow:escrow@127.0.0.1:5432/escrow_test}"
    -e REDIS_URL="${TEST_REDIS_URL:-redis://127.0.0.1:6379/15}"
    -e KAFKA_GROUP_ID="escrow-$run" -e KAFKA_CLIENT_ID="escrow-$run"
    -e KAFKA_COMMANDS_TOPIC="$run.commands" -e KAFKA_EVENTS_TOPIC="$run.events"
    -e KAFKA_REJECTIONS_TOPIC="$run.rejections" -e KAFKA_DLQ_TOPIC="$run.commands.dlq"
    -e WEB_HOST=127.0.0.1 -e PORT="$port"
    -e PAYMENTS_EFFECTS_ENABLED=false -e STRIPE_API_BASE=http://127.0.0.1:12111
  )
  local run_opts=(--network host)
  # shellcheck disable=SC2207
  run_opts+=($(limits))
  SMOKE_RUN=$run
  trap smoke_cleanup EXIT

  log "db status, topics create ($run)"
  podman_ run --rm --no-healthcheck "${run_opts[@]}" "${env[@]}" "$image" db status
  podman_ run --rm --no-healthcheck "${run_opts[@]}" "${env[@]}" "$image" topics create

  log "worker $name on 127.0.0.1:$port"
  podman_ run -d --name "$name" "${run_opts[@]}" "${env[@]}" "$image" >/dev/null 2>"$IMAGE_WORK/run.err" \
    || { cat "$IMAGE_WORK/run.err" >&2; die "podman run failed"; }
  # podman logs a systemd error for the healthcheck timer where no systemd runs (run.err);
  # the check itself is run below with `podman healthcheck run`.
  SMOKE_NAME=$name
  local started health ready deadline
  started=$(date +%s)
  deadline=$((started + HEALTH_WAIT_S))
  while :; do
    [ "$(podman_ inspect -f '{{.State.Running}}' "$name")" = true ] \
      || { podman_ logs "$name" 2>&1 | tail -30 >&2; die "the worker exited"; }
    health=$(http_status "http://127.0.0.1:$port/health")
    ready=$(http_status "http://127.0.0.1:$port/ready")
    [ "$health$ready" = 200200 ] && break
    [ "$(date +%s)" -lt "$deadline" ] \
      || { podman_ logs "$name" 2>&1 | tail -30 >&2; die "/health $health, /ready $ready after ${HEALTH_WAIT_S}s"; }
    sleep 0.5
  done
  log "/health and /ready 200 after $(($(date +%s) - started))s"
  podman_ healthcheck run "$name" 2>/dev/null || die "the image's HEALTHCHECK failed"
  log "HEALTHCHECK passed; user $(podman_ exec "$name" id -un), DATA_DIR $(podman_ exec "$name" sh -c 'ls -d "$DATA_DIR"/*')"
  podman_ stop -t 60 "$name" >/dev/null 2>&1
  local code
  code=$(podman_ inspect -f '{{.State.ExitCode}}' "$name")
  [ "$code" = 0 ] || { podman_ logs "$name" 2>&1 | tail -30 >&2; die "the worker exited with $code on SIGTERM"; }
  log "stopped cleanly (exit 0)"
}

case "${1:-}" in
  base) base ;;
  build) build ;;
  smoke) smoke ;;
  *) echo "usage: $0 base|build|smoke" >&2; exit 2 ;;
esac
