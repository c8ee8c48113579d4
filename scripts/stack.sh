#!/usr/bin/env bash
# Local service stack for escrow-stream: Apache Kafka (KRaft, from Maven
# Central), PostgreSQL, Redis, stripe-mock and a local S3 (moto).  No Docker.
#
#   scripts/stack.sh up     [service...]   start (idempotent; no-op when up)
#   scripts/stack.sh down   [service...]   stop what THIS script started
#   scripts/stack.sh status [service...]   one line per service; exit 0 iff all up
#
# Services: kafka postgres redis stripe-mock s3   (default: all, in that order)
#
# Runtime state lives in $STACK_DIR (default <repo>/.stack, git-ignored).
# Environment knobs:
#   KAFKA_VERSION          Kafka broker version from Maven Central (default 3.9.2;
#                          4.x selects the log4j2 profile of stack/kafka/pom.xml)
#   KAFKA_PORT             PLAINTEXT listener port (default 9092)
#   KAFKA_CONTROLLER_PORT  KRaft controller port (default 9093)
#   KAFKA_START_TIMEOUT    seconds to wait for the broker (default 90)
#   KAFKA_HEAP_OPTS        default "-Xms256m -Xmx1g"
#   PG_PORT / REDIS_PORT   default 5432 / 6379
#   STRIPE_MOCK_PORT       default 12111
#   S3_PORT                local S3 (moto + presigned-URL check, stack/s3/server.py),
#                          default 4566; dev bucket S3_DEV_BUCKET (escrow-stream-dev)
#
# To add a service: write
# <name>_up / <name>_down / <name>_status functions and add <name> to SERVICES.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK_DIR="${STACK_DIR:-$REPO/.stack}"
SERVICES=(kafka postgres redis stripe-mock s3)
export DEBIAN_FRONTEND=noninteractive

KAFKA_DEFAULT_VERSION=3.9.2
KAFKA_VERSION="${KAFKA_VERSION:-$KAFKA_DEFAULT_VERSION}"
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx1g}"
PG_PORT="${PG_PORT:-5432}"
PG_MIN_MAJOR=15
REDIS_PORT="${REDIS_PORT:-6379}"
STRIPE_MOCK_PORT="${STRIPE_MOCK_PORT:-12111}"
# Pinned so every machine runs the same mock; built once into .stack/bin with go install.
STRIPE_MOCK_VERSION="${STRIPE_MOCK_VERSION:-v0.203.0}"
S3_PORT="${S3_PORT:-4566}"
S3_DEV_BUCKET="${S3_DEV_BUCKET:-escrow-stream-dev}"
# moto's S3 backend and the Flask it serves with, in a venv of their own under the stack
# dir (installed once, ~10 s; the project venv is not needed). Only what S3 needs, not the
# whole moto[server] extra (cfn-lint, docker, ... : twice the size and time).
S3_REQUIREMENTS=("moto[s3]>=5.1,<6" "flask>=3,<4" "flask-cors>=4,<7")

# The default version keeps the documented layout (.stack/kafka, .stack/kafka.pid);
# other versions get their own dirs so they never share a data dir.
if [[ "$KAFKA_VERSION" == "$KAFKA_DEFAULT_VERSION" ]]; then
  KAFKA_NAME=kafka
else
  KAFKA_NAME="kafka-$KAFKA_VERSION"
fi
KAFKA_HOME="$STACK_DIR/$KAFKA_NAME"
KAFKA_PID_FILE="$STACK_DIR/$KAFKA_NAME.pid"
KAFKA_LIBS="$KAFKA_HOME/libs"
KAFKA_LOGS="$KAFKA_HOME/logs"
KAFKA_DATA="$KAFKA_HOME/data"
KAFKA_PROPS="$KAFKA_HOME/server.properties"
KAFKA_MAJOR="${KAFKA_VERSION%%.*}"

PG_MARKER="$STACK_DIR/postgres.started"
REDIS_PID_FILE="$STACK_DIR/redis.pid"
REDIS_DIR="$STACK_DIR/redis"

# ---------------------------------------------------------------- helpers ---

say() { printf 'stack: %s\n' "$*"; }
die() { printf 'stack: ERROR: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

# port_open HOST PORT -> 0 if something accepts TCP connections there.
port_open() {
  # shellcheck disable=SC2016  # expanded by the inner bash
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# pid_alive PID [CMDLINE-SUBSTRING] -> 0 if PID runs (and its cmdline matches).
pid_alive() {
  local pid="$1" want="${2:-}"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  [[ -z "$want" ]] && return 0
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$want"
}

read_pid() { if [[ -f "$1" ]]; then head -n1 "$1" | tr -dc '0-9'; fi; }

# stop_pid NAME PID [SECONDS]: TERM, wait, then KILL.
stop_pid() {
  local name="$1" pid="$2" secs="${3:-30}" i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < secs * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  say "$name (pid $pid) did not stop in ${secs}s, sending KILL"
  kill -KILL "$pid" 2>/dev/null || true
}

# down_ours NAME PID_FILE PID: stop a service this script started (PID empty: not ours).
down_ours() {
  local name="$1" pid_file="$2" pid="$3"
  if [[ -z "$pid" ]]; then
    rm -f "$pid_file"
    say "$name: not started by us, nothing to stop"
    return 0
  fi
  stop_pid "$name" "$pid" 10
  rm -f "$pid_file"
  say "$name stopped (pid $pid)"
}

status_line() { # name up|down ours|external|- pid port [note]
  printf '%-10s %-5s %-9s pid=%-8s %s%s\n' "$1" "$2" "$3" "${4:--}" "$5" "${6:+  ($6)}"
}

# apt_install PKG...: non-interactive install; never lets apt start services
# (we start our own), runs apt-get update once if the package is unknown.
apt_install() {
  command -v apt-get >/dev/null || die "need $* but apt-get is not available"
  local made_policy=0 rc=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  say "apt-get install $*"
  local log="$STACK_DIR/apt.log"
  local apt=(apt-get -o DPkg::Lock::Timeout=300 -y -q --no-install-recommends)
  if ! "${apt[@]}" install "$@" >>"$log" 2>&1; then
    apt-get -o DPkg::Lock::Timeout=300 -q update >>"$log" 2>&1 || true
    "${apt[@]}" install "$@" >>"$log" 2>&1 || rc=$?
  fi
  [[ $made_policy == 1 ]] && rm -f /usr/sbin/policy-rc.d
  [[ $rc == 0 ]] || { tail -n 20 "$log" >&2; die "apt-get install $* failed (log: $log)"; }
}

need_root_for() { [[ $(id -u) == 0 ]] || die "$1 needs root (apt / runuser); run as root or start it yourself"; }

# ------------------------------------------------------------------ kafka ---

kafka_cp() { printf '%s/*' "$KAFKA_LIBS"; }

kafka_our_pid() {
  local pid
  pid="$(read_pid "$KAFKA_PID_FILE")"
  if [[ -n "$pid" ]] && pid_alive "$pid" "$KAFKA_PROPS"; then echo "$pid"; fi
}

kafka_ready() {
  if command -v python3 >/dev/null; then
    python3 "$REPO/scripts/kafka_ready.py" "127.0.0.1:$KAFKA_PORT" --timeout 2 >/dev/null 2>&1
  else # fallback: a real ApiVersions round-trip with Kafka's own tool (slower, JVM start)
    java -cp "$(kafka_cp)" kafka.admin.BrokerApiVersionsCommand \
      --bootstrap-server "127.0.0.1:$KAFKA_PORT" >/dev/null 2>&1
  fi
}

kafka_ensure_tools() {
  local pkgs=()
  command -v java >/dev/null || pkgs+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null || pkgs+=(maven)
  command -v python3 >/dev/null || pkgs+=(python3-minimal)
  if ((${#pkgs[@]})); then need_root_for kafka; apt_install "${pkgs[@]}"; fi
}

# Resolve the broker jars with Maven once; re-run only when the pom or the
# version changes (stamp = sha256 of pom + version).
kafka_libs() {
  local pom="$REPO/stack/kafka/pom.xml" stamp want profile=kafka3
  [[ "$KAFKA_MAJOR" -ge 4 ]] && profile=kafka4
  want="$(sha256sum "$pom" | cut -d' ' -f1) kafka=$KAFKA_VERSION profile=$profile"
  stamp="$KAFKA_HOME/libs.stamp"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && compgen -G "$KAFKA_LIBS/kafka_2.13-*.jar" >/dev/null; then
    return 0
  fi
  local t0 tmp
  t0="$(now)"
  say "kafka: resolving org.apache.kafka:kafka_2.13:$KAFKA_VERSION with Maven (profile $profile)"
  tmp="$KAFKA_HOME/libs.tmp"
  rm -rf "$tmp"
  if ! mvn -B -ntp -Dstyle.color=never -f "$pom" -P "$profile" \
    -Dkafka.version="$KAFKA_VERSION" \
    dependency:copy-dependencies -DoutputDirectory="$tmp" >"$KAFKA_LOGS/maven.log" 2>&1; then
    tail -n 30 "$KAFKA_LOGS/maven.log" >&2
    die "maven failed (log: $KAFKA_LOGS/maven.log)"
  fi
  rm -rf "$KAFKA_LIBS"
  mv "$tmp" "$KAFKA_LIBS"
  echo "$want" >"$stamp"
  say "kafka: $(find "$KAFKA_LIBS" -name '*.jar' | wc -l) jars in $KAFKA_LIBS ($(since "$t0"))"
}

# Effective config = static stack/kafka/server.properties + machine-specific
# overrides appended (last key wins in Java properties).
kafka_write_props() {
  {
    cat "$REPO/stack/kafka/server.properties"
    echo
    echo "# ---- generated by scripts/stack.sh; edit stack/kafka/server.properties instead"
    echo "log.dirs=$KAFKA_DATA"
    echo "controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT"
    echo "listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT"
    echo "advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT"
    if [[ "$KAFKA_MAJOR" -ge 4 ]]; then
      echo "share.coordinator.state.topic.replication.factor=1"
      echo "share.coordinator.state.topic.min.isr=1"
    fi
  } >"$KAFKA_PROPS.tmp"
  mv "$KAFKA_PROPS.tmp" "$KAFKA_PROPS"
}

kafka_log_opts() {
  if [[ "$KAFKA_MAJOR" -ge 4 ]]; then
    echo "-Dlog4j2.configurationFile=$REPO/stack/kafka/log4j2.properties"
  else
    echo "-Dlog4j.configuration=file:$REPO/stack/kafka/log4j.properties"
  fi
}

kafka_format() {
  [[ -f "$KAFKA_DATA/meta.properties" ]] && return 0
  local cid
  if [[ ! -s "$KAFKA_HOME/cluster-id" ]]; then
    # shellcheck disable=SC2046
    java $(kafka_log_opts) -Dkafka.logs.dir="$KAFKA_LOGS" -cp "$(kafka_cp)" \
      kafka.tools.StorageTool random-uuid 2>>"$KAFKA_LOGS/storage-tool.log" |
      tail -n1 | tr -d '[:space:]' >"$KAFKA_HOME/cluster-id"
  fi
  cid="$(cat "$KAFKA_HOME/cluster-id")"
  [[ -n "$cid" ]] || die "kafka: StorageTool random-uuid produced nothing (see $KAFKA_LOGS/storage-tool.log)"
  say "kafka: formatting $KAFKA_DATA (cluster id $cid)"
  # shellcheck disable=SC2046
  if ! java $(kafka_log_opts) -Dkafka.logs.dir="$KAFKA_LOGS" -cp "$(kafka_cp)" \
    kafka.tools.StorageTool format -t "$cid" -c "$KAFKA_PROPS" >>"$KAFKA_LOGS/storage-tool.log" 2>&1; then
    tail -n 20 "$KAFKA_LOGS/storage-tool.log" >&2
    die "kafka: storage format failed"
  fi
}

kafka_up() {
  local pid t0
  pid="$(kafka_our_pid)"
  if [[ -n "$pid" ]]; then
    if kafka_ready; then say "kafka already up (pid $pid)"; return 0; fi
    say "kafka: pid $pid running but not answering yet; waiting"
  elif port_open 127.0.0.1 "$KAFKA_PORT"; then
    if kafka_ready; then say "kafka: external broker already on 127.0.0.1:$KAFKA_PORT, using it"; return 0; fi
    die "kafka: port $KAFKA_PORT is taken by something that does not answer Kafka metadata requests"
  else
    mkdir -p "$KAFKA_LIBS" "$KAFKA_LOGS" "$KAFKA_DATA"
    kafka_ensure_tools
    kafka_libs
    kafka_write_props
    kafka_format
    t0="$(now)"
    local -a jvm
    read -r -a jvm <<<"$KAFKA_HEAP_OPTS"
    jvm+=(-XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true
      "$(kafka_log_opts)" -Dkafka.logs.dir="$KAFKA_LOGS" -cp "$(kafka_cp)")
    # The wrapper shell records its own pid then execs java, so the pid file
    # holds the broker's pid; setsid detaches it from our session/terminal.
    # A pid file left by a broker that died with the machine would be read
    # before the launcher writes the new one: no broker of ours runs here.
    rm -f "$KAFKA_PID_FILE"
    # shellcheck disable=SC2016  # expanded by the inner bash
    setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$KAFKA_PID_FILE" \
      java "${jvm[@]}" kafka.Kafka "$KAFKA_PROPS" \
      </dev/null >>"$KAFKA_LOGS/kafka.out" 2>&1 &
    disown || true
    local i
    for ((i = 0; i < 100; i++)); do [[ -s "$KAFKA_PID_FILE" ]] && break; sleep 0.05; done
    pid="$(read_pid "$KAFKA_PID_FILE")"
    [[ -n "$pid" ]] || die "kafka: launcher did not write $KAFKA_PID_FILE"
  fi
  t0="${t0:-$(now)}"
  local deadline=$((SECONDS + KAFKA_START_TIMEOUT))
  until kafka_ready; do
    if ! pid_alive "$pid"; then
      tail -n 40 "$KAFKA_LOGS/kafka.out" "$KAFKA_LOGS/server.log" >&2 2>/dev/null || true
      rm -f "$KAFKA_PID_FILE"
      die "kafka exited during startup (logs: $KAFKA_LOGS)"
    fi
    if ((SECONDS >= deadline)); then
      tail -n 40 "$KAFKA_LOGS/kafka.out" "$KAFKA_LOGS/server.log" >&2 2>/dev/null || true
      die "kafka did not answer on 127.0.0.1:$KAFKA_PORT within ${KAFKA_START_TIMEOUT}s (pid $pid still running; 'scripts/stack.sh down kafka' stops it)"
    fi
    sleep 0.5
  done
  say "kafka $KAFKA_VERSION up (pid $pid) in $(since "$t0") on 127.0.0.1:$KAFKA_PORT"
}

kafka_down() {
  local pid
  pid="$(kafka_our_pid)"
  if [[ -z "$pid" ]]; then
    rm -f "$KAFKA_PID_FILE"
    say "kafka: not started by us, nothing to stop"
    return 0
  fi
  local t0
  t0="$(now)"
  stop_pid kafka "$pid" 60
  rm -f "$KAFKA_PID_FILE"
  say "kafka stopped (pid $pid) in $(since "$t0")"
}

kafka_status() {
  local pid
  pid="$(kafka_our_pid)"
  if [[ -n "$pid" ]]; then
    if kafka_ready; then status_line kafka up ours "$pid" "127.0.0.1:$KAFKA_PORT" "$KAFKA_VERSION"; return 0; fi
    status_line kafka down ours "$pid" "127.0.0.1:$KAFKA_PORT" "process running, not answering metadata"
    return 1
  fi
  if kafka_ready; then status_line kafka up external - "127.0.0.1:$KAFKA_PORT"; return 0; fi
  status_line kafka down - - "127.0.0.1:$KAFKA_PORT"
  return 1
}

# --------------------------------------------------------------- postgres ---

pg_bindir() {
  local d best="" bestv=0 v
  for d in /usr/lib/postgresql/*/bin; do
    [[ -x "$d/postgres" && -x "$d/initdb" ]] || continue
    v="$(basename "$(dirname "$d")")"
    [[ "$v" =~ ^[0-9]+$ ]] || continue
    if ((v >= PG_MIN_MAJOR && v > bestv)); then best="$d"; bestv="$v"; fi
  done
  [[ -n "$best" ]] && echo "$best"
}

pg_ready() {
  if command -v pg_isready >/dev/null; then
    pg_isready -q -h 127.0.0.1 -p "$PG_PORT" -t 2
  else
    port_open 127.0.0.1 "$PG_PORT"
  fi
}

# Data dir: <stack>/postgres/data if the postgres user can reach it, else a
# per-repo dir under /var/tmp (recorded in <stack>/postgres.location).
pg_home() {
  if [[ -s "$STACK_DIR/postgres.location" ]]; then cat "$STACK_DIR/postgres.location"; return; fi
  local home="$STACK_DIR/postgres"
  mkdir -p "$home"
  chown postgres:postgres "$home"
  if ! runuser -u postgres -- test -w "$home" -a -x "$home"; then
    home="/var/tmp/escrow-stream-$(printf '%s' "$REPO" | sha256sum | cut -c1-12)/postgres"
    mkdir -p "$home"
    chown postgres:postgres "$home" "$(dirname "$home")"
    say "postgres: $STACK_DIR is not reachable by user postgres; data dir is under $home" >&2
  fi
  echo "$home" >"$STACK_DIR/postgres.location"
  echo "$home"
}

pg_ours() { # -> prints data dir if WE started the running server
  [[ -f "$PG_MARKER" ]] || return 1
  local data pid
  data="$(head -n1 "$PG_MARKER")"
  pid="$(read_pid "$data/postmaster.pid" 2>/dev/null || true)"
  if [[ -n "$pid" ]] && pid_alive "$pid" postgres; then echo "$data"; return 0; fi
  return 1
}

pg_psql_super() { # runs psql as a superuser (stdin = SQL); tries ways in order
  local sock
  if [[ -f "$PG_MARKER" ]]; then
    sock="$(sed -n 2p "$PG_MARKER")"
    (cd / && runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -h "$sock" -p "$PG_PORT" -d postgres)
    return
  fi
  local sql
  sql="$(cat)"
  if [[ $(id -u) == 0 ]] && id postgres >/dev/null 2>&1 &&
    (cd / && runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres <<<"$sql") 2>/dev/null; then
    return 0
  fi
  psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -w <<<"$sql" 2>/dev/null
}

pg_app_ok() {
  PGPASSWORD=escrow PGCONNECT_TIMEOUT=3 psql -X -q -w -h 127.0.0.1 -p "$PG_PORT" -U escrow -d escrow_test -c 'select 1' >/dev/null 2>&1 &&
    PGPASSWORD=escrow PGCONNECT_TIMEOUT=3 psql -X -q -w -h 127.0.0.1 -p "$PG_PORT" -U escrow -d escrow -c 'select 1' >/dev/null 2>&1
}

pg_bootstrap() {
  pg_app_ok && return 0
  if ! pg_psql_super <<'SQL'; then
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'escrow') THEN
    CREATE ROLE escrow LOGIN CREATEDB PASSWORD 'escrow';
  ELSE
    ALTER ROLE escrow LOGIN CREATEDB PASSWORD 'escrow';
  END IF;
END $$;
SELECT 'CREATE DATABASE escrow OWNER escrow' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'escrow')\gexec
SELECT 'CREATE DATABASE escrow_test OWNER escrow' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'escrow_test')\gexec
SQL
    cat >&2 <<EOF
stack: postgres on 127.0.0.1:$PG_PORT is not ours and no superuser access worked
stack: (tried: runuser -u postgres -- psql; psql -h 127.0.0.1 -U postgres). As a superuser run:
  CREATE ROLE escrow LOGIN CREATEDB PASSWORD 'escrow';
  CREATE DATABASE escrow OWNER escrow;
  CREATE DATABASE escrow_test OWNER escrow;
EOF
    return 1
  fi
  pg_app_ok || die "postgres: role/databases created but login as escrow@127.0.0.1 fails (check pg_hba.conf)"
  say "postgres: role escrow, databases escrow + escrow_test ready"
}

pg_up() {
  local data
  if data="$(pg_ours)"; then
    pg_bootstrap
    say "postgres already up (ours, $data)"
    return 0
  fi
  if pg_ready; then
    say "postgres: external server already on 127.0.0.1:$PG_PORT, using it"
    pg_bootstrap || die "postgres: escrow role/databases missing"
    return 0
  fi
  need_root_for postgres
  local bin
  bin="$(pg_bindir || true)"
  if [[ -z "$bin" ]]; then
    apt_install postgresql
    bin="$(pg_bindir || true)"
    [[ -n "$bin" ]] || die "postgres: no PostgreSQL >= $PG_MIN_MAJOR binaries after apt-get install"
  fi
  command -v psql >/dev/null || apt_install postgresql-client
  id postgres >/dev/null 2>&1 ||
    useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/bash postgres
  local home sock log t0
  t0="$(now)"
  home="$(pg_home)"
  data="$home/data"
  sock="$home/run"
  log="$home/postgres.log"
  if ((${#sock} > 90)); then # unix socket path limit is ~107 bytes
    sock="/tmp/escrow-stream-pg-$(printf '%s' "$REPO" | sha256sum | cut -c1-12)"
  fi
  mkdir -p "$sock"
  chown postgres:postgres "$sock"
  chmod 700 "$sock"
  if [[ ! -f "$data/PG_VERSION" ]]; then
    say "postgres: initdb $data ($bin)"
    (cd / && runuser -u postgres -- "$bin/initdb" -D "$data" -U postgres -E UTF8 --locale=C \
      --auth-local=peer --auth-host=scram-sha-256 >"$home/initdb.log" 2>&1) ||
      { tail -n 20 "$home/initdb.log" >&2; die "postgres: initdb failed"; }
  fi
  # Dev/test server: durability off for speed (data dir is disposable).
  if ! (cd / && runuser -u postgres -- "$bin/pg_ctl" -D "$data" -l "$log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -c unix_socket_directories=$sock -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
    start >/dev/null); then
    tail -n 20 "$log" >&2
    die "postgres: pg_ctl start failed"
  fi
  printf '%s\n%s\n%s\n' "$data" "$sock" "$bin" >"$PG_MARKER"
  pg_bootstrap
  say "postgres up (pid $(read_pid "$data/postmaster.pid")) in $(since "$t0") on 127.0.0.1:$PG_PORT"
}

pg_down() {
  local data bin
  if ! data="$(pg_ours)"; then
    rm -f "$PG_MARKER"
    say "postgres: not started by us, nothing to stop"
    return 0
  fi
  bin="$(sed -n 3p "$PG_MARKER")"
  (cd / && runuser -u postgres -- "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null)
  rm -f "$PG_MARKER"
  say "postgres stopped"
}

pg_status() {
  local data pid
  if data="$(pg_ours)"; then
    pid="$(read_pid "$data/postmaster.pid")"
    if pg_ready; then status_line postgres up ours "$pid" "127.0.0.1:$PG_PORT"; return 0; fi
    status_line postgres down ours "$pid" "127.0.0.1:$PG_PORT" "running, not accepting connections"
    return 1
  fi
  if pg_ready; then status_line postgres up external - "127.0.0.1:$PG_PORT"; return 0; fi
  status_line postgres down - - "127.0.0.1:$PG_PORT"
  return 1
}

# ------------------------------------------------------------------ redis ---

redis_our_pid() {
  local pid
  pid="$(read_pid "$REDIS_PID_FILE")"
  if [[ -n "$pid" ]] && pid_alive "$pid" "redis-server"; then echo "$pid"; fi
}

redis_ping() {
  # RESP PING over /dev/tcp; no redis-cli needed.
  # shellcheck disable=SC2016  # expanded by the inner bash
  timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"; printf "PING\r\n" >&3; IFS= read -r l <&3; [[ "$l" == "+PONG"* ]]' _ "$REDIS_PORT" 2>/dev/null
}

redis_up() {
  local pid t0
  pid="$(redis_our_pid)"
  if [[ -n "$pid" ]]; then say "redis already up (pid $pid)"; return 0; fi
  if port_open 127.0.0.1 "$REDIS_PORT"; then
    redis_ping || die "redis: port $REDIS_PORT is taken by something that does not answer PING"
    say "redis: external server already on 127.0.0.1:$REDIS_PORT, using it"
    return 0
  fi
  if ! command -v redis-server >/dev/null; then
    need_root_for redis
    apt_install redis-server
  fi
  t0="$(now)"
  mkdir -p "$REDIS_DIR"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes \
    --pidfile "$REDIS_PID_FILE" --dir "$REDIS_DIR" --logfile "$REDIS_DIR/redis.log" \
    --save '' --appendonly no >/dev/null
  local i
  for ((i = 0; i < 100; i++)); do redis_ping && break; sleep 0.1; done
  redis_ping || { tail -n 20 "$REDIS_DIR/redis.log" >&2; die "redis did not answer PING"; }
  say "redis up (pid $(read_pid "$REDIS_PID_FILE")) in $(since "$t0") on 127.0.0.1:$REDIS_PORT"
}

redis_down() { down_ours redis "$REDIS_PID_FILE" "$(redis_our_pid)"; }

redis_status() {
  local pid
  pid="$(redis_our_pid)"
  if [[ -n "$pid" ]]; then
    if redis_ping; then status_line redis up ours "$pid" "127.0.0.1:$REDIS_PORT"; return 0; fi
    status_line redis down ours "$pid" "127.0.0.1:$REDIS_PORT" "running, not answering PING"
    return 1
  fi
  if redis_ping; then status_line redis up external - "127.0.0.1:$REDIS_PORT"; return 0; fi
  status_line redis down - - "127.0.0.1:$REDIS_PORT"
  return 1
}

# ------------------------------------------------------------ stripe-mock ---

STRIPE_MOCK_BIN="$STACK_DIR/bin/stripe-mock-$STRIPE_MOCK_VERSION"
STRIPE_MOCK_PID_FILE="$STACK_DIR/stripe-mock.pid"
STRIPE_MOCK_LOG="$STACK_DIR/stripe-mock.log"

stripe_mock_our_pid() {
  local pid
  pid="$(read_pid "$STRIPE_MOCK_PID_FILE")"
  if [[ -n "$pid" ]] && pid_alive "$pid" "stripe-mock"; then echo "$pid"; fi
}

stripe_mock_up() {
  local pid t0 i
  pid="$(stripe_mock_our_pid)"
  if [[ -n "$pid" ]]; then say "stripe-mock already up (pid $pid)"; return 0; fi
  if port_open 127.0.0.1 "$STRIPE_MOCK_PORT"; then
    say "stripe-mock: something already listens on 127.0.0.1:$STRIPE_MOCK_PORT, using it"
    return 0
  fi
  t0="$(now)"
  if [[ ! -x "$STRIPE_MOCK_BIN" ]]; then
    command -v go >/dev/null || die "stripe-mock: Go is needed to build it (go install)"
    say "stripe-mock: go install github.com/stripe/stripe-mock@$STRIPE_MOCK_VERSION"
    mkdir -p "$STACK_DIR/bin"
    local build="$STACK_DIR/bin/build-stripe-mock"
    GOBIN="$build" go install "github.com/stripe/stripe-mock@$STRIPE_MOCK_VERSION" \
      || die "stripe-mock: go install failed"
    mv "$build/stripe-mock" "$STRIPE_MOCK_BIN"
    rm -rf "$build"
  fi
  nohup setsid "$STRIPE_MOCK_BIN" -http-port "$STRIPE_MOCK_PORT" -https-port 0 \
    >"$STRIPE_MOCK_LOG" 2>&1 &
  echo $! >"$STRIPE_MOCK_PID_FILE"
  for ((i = 0; i < 100; i++)); do port_open 127.0.0.1 "$STRIPE_MOCK_PORT" && break; sleep 0.1; done
  port_open 127.0.0.1 "$STRIPE_MOCK_PORT" \
    || { tail -n 20 "$STRIPE_MOCK_LOG" >&2; die "stripe-mock did not open its port"; }
  say "stripe-mock up (pid $(read_pid "$STRIPE_MOCK_PID_FILE")) in $(since "$t0") on 127.0.0.1:$STRIPE_MOCK_PORT"
}

stripe_mock_down() { down_ours stripe-mock "$STRIPE_MOCK_PID_FILE" "$(stripe_mock_our_pid)"; }

stripe_mock_status() {
  local pid
  pid="$(stripe_mock_our_pid)"
  if [[ -n "$pid" ]] && port_open 127.0.0.1 "$STRIPE_MOCK_PORT"; then
    status_line stripe-mock up ours "$pid" "127.0.0.1:$STRIPE_MOCK_PORT" "$STRIPE_MOCK_VERSION"
    return 0
  fi
  if port_open 127.0.0.1 "$STRIPE_MOCK_PORT"; then
    status_line stripe-mock up external - "127.0.0.1:$STRIPE_MOCK_PORT"; return 0
  fi
  status_line stripe-mock down - - "127.0.0.1:$STRIPE_MOCK_PORT"
  return 1
}

# --------------------------------------------------------------------- s3 ---

S3_VENV="$STACK_DIR/s3-venv"
S3_SERVER="$REPO/stack/s3/server.py"
S3_PID_FILE="$STACK_DIR/s3.pid"
S3_LOG="$STACK_DIR/s3.log"

s3_our_pid() {
  local pid
  pid="$(read_pid "$S3_PID_FILE")"
  if [[ -n "$pid" ]] && pid_alive "$pid" "$S3_SERVER"; then echo "$pid"; fi
}

# s3_http METHOD PATH -> prints the HTTP status of an unsigned request to the local S3.
s3_http() {
  # shellcheck disable=SC2016  # expanded by the inner bash
  timeout 5 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"
    printf "%s %s HTTP/1.0\r\nHost: 127.0.0.1:%s\r\nContent-Length: 0\r\n\r\n" "$2" "$3" "$1" >&3
    IFS=" " read -r _ code _ <&3; printf "%s" "$code"' _ "$S3_PORT" "$1" "$2" 2>/dev/null
}

s3_answers() { [[ "$(s3_http GET /)" =~ ^[0-9]{3}$ ]]; }

s3_moto_version() {
  local d
  for d in "$S3_VENV"/lib/python3*/site-packages/moto-*.dist-info; do
    [[ -d "$d" ]] && { d="${d##*/moto-}"; echo "moto ${d%.dist-info}"; return 0; }
  done
  return 0
}

# The venv is built once; the stamp (requirements + interpreter) says it is complete, so a
# second `up` never reinstalls, and a changed requirement rebuilds it.
s3_venv() {
  local python="${S3_PYTHON:-python3}" want t0
  command -v "$python" >/dev/null || { need_root_for s3; apt_install python3 python3-venv; }
  want="$("$python" -c 'import sys; print(sys.version.split()[0])') ${S3_REQUIREMENTS[*]}"
  if [[ -x "$S3_VENV/bin/python" && -f "$S3_VENV/.installed" && "$(cat "$S3_VENV/.installed")" == "$want" ]]; then
    return 0
  fi
  t0="$(now)"
  say "s3: installing ${S3_REQUIREMENTS[*]} into $S3_VENV"
  rm -rf "$S3_VENV"
  if ! "$python" -m venv "$S3_VENV" >>"$S3_LOG" 2>&1; then
    need_root_for s3
    apt_install python3-venv
    rm -rf "$S3_VENV"
    "$python" -m venv "$S3_VENV" >>"$S3_LOG" 2>&1 || die "s3: python3 -m venv failed (log: $S3_LOG)"
  fi
  if ! "$S3_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "${S3_REQUIREMENTS[@]}" >>"$S3_LOG" 2>&1; then
    tail -n 20 "$S3_LOG" >&2
    die "s3: pip install failed (log: $S3_LOG)"
  fi
  echo "$want" >"$S3_VENV/.installed"
  say "s3: $(s3_moto_version) installed in $(since "$t0")"
}

# The development bucket, created when missing (200 new, 409 already ours: both fine).
s3_dev_bucket() {
  local code
  code="$(s3_http PUT "/$S3_DEV_BUCKET")" || true
  case "$code" in
    200 | 409) ;;
    *) say "s3: could not create bucket $S3_DEV_BUCKET (HTTP ${code:-no answer}); create it yourself" ;;
  esac
}

s3_up() {
  local pid t0 i
  pid="$(s3_our_pid)"
  if [[ -n "$pid" ]] && s3_answers; then
    s3_dev_bucket
    say "s3 already up (pid $pid)"
    return 0
  fi
  t0="$(now)"
  if [[ -n "$pid" ]]; then
    say "s3: pid $pid running but not answering yet; waiting"
  elif port_open 127.0.0.1 "$S3_PORT"; then
    s3_answers || die "s3: port $S3_PORT is taken by something that does not answer HTTP"
    s3_dev_bucket
    say "s3: something already serves HTTP on 127.0.0.1:$S3_PORT, using it"
    return 0
  else
    s3_venv
    t0="$(now)"
    S3_ACCESS_KEY_ID="${S3_ACCESS_KEY_ID:-dev-access-key}" \
      S3_SECRET_ACCESS_KEY="${S3_SECRET_ACCESS_KEY:-dev-secret-key}" \
      nohup setsid "$S3_VENV/bin/python" "$S3_SERVER" --host 127.0.0.1 --port "$S3_PORT" \
      >>"$S3_LOG" 2>&1 &
    echo $! >"$S3_PID_FILE"
    pid="$(read_pid "$S3_PID_FILE")"
  fi
  for ((i = 0; i < 200; i++)); do
    s3_answers && break
    pid_alive "$pid" || break
    sleep 0.1
  done
  if ! s3_answers; then
    tail -n 20 "$S3_LOG" >&2
    die "s3 did not answer on 127.0.0.1:$S3_PORT"
  fi
  s3_dev_bucket
  say "s3 up (pid $pid) in $(since "$t0") on 127.0.0.1:$S3_PORT, bucket $S3_DEV_BUCKET"
}

s3_down() { down_ours s3 "$S3_PID_FILE" "$(s3_our_pid)"; }

s3_status() {
  local pid
  pid="$(s3_our_pid)"
  if [[ -n "$pid" ]]; then
    if s3_answers; then status_line s3 up ours "$pid" "127.0.0.1:$S3_PORT" "$(s3_moto_version)"; return 0; fi
    status_line s3 down ours "$pid" "127.0.0.1:$S3_PORT" "running, not answering HTTP"
    return 1
  fi
  if s3_answers; then status_line s3 up external - "127.0.0.1:$S3_PORT"; return 0; fi
  status_line s3 down - - "127.0.0.1:$S3_PORT"
  return 1
}

# ------------------------------------------------------------------- main ---

svc_prefix() { # service name -> function prefix
  case "$1" in
    postgres | pg | postgresql) echo pg ;;
    stripe-mock) echo stripe_mock ;;
    *) echo "$1" ;;
  esac
}

usage() {
  echo "usage: $0 up|down|status [${SERVICES[*]}]" >&2
  exit 2
}

main() {
  (($# >= 1)) || usage
  local cmd="$1"
  shift
  local -a svcs=("$@")
  ((${#svcs[@]})) || svcs=("${SERVICES[@]}")
  local s p
  for s in "${svcs[@]}"; do
    p="$(svc_prefix "$s")"
    declare -F "${p}_up" >/dev/null || die "unknown service '$s' (known: ${SERVICES[*]})"
  done
  mkdir -p "$STACK_DIR"
  case "$cmd" in
    up)
      local t0
      t0="$(now)"
      for s in "${svcs[@]}"; do "$(svc_prefix "$s")_up"; done
      say "up in $(since "$t0")"
      ;;
    down)
      local -a rev=()
      for s in "${svcs[@]}"; do rev=("$s" "${rev[@]}"); done
      for s in "${rev[@]}"; do "$(svc_prefix "$s")_down"; done
      ;;
    status)
      local rc=0
      for s in "${svcs[@]}"; do "$(svc_prefix "$s")_status" || rc=1; done
      return "$rc"
      ;;
    *) usage ;;
  esac
}

main "$@"
