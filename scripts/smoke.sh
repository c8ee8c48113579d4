#!/usr/bin/env bash
# Post-deployment verification (the seed's "Post-Deployment Verification"), against a
# deployed API only: no broker or database access needed from where it runs.
#
#   scripts/smoke.sh BASE_URL TOKEN
#
# TOKEN is a JWT of a smoke-test buyer (role user) — or of a service, with SMOKE_BUYER_ID
# naming the buyer. With FEATURE_KYC_GATING on (the default) the buyer and SMOKE_SELLER_ID
# must be VERIFIED first (PUT /api/kyc/{userId}, by an admin or service). It never prints
# the token.
#
#   1. GET /health        200 {"status":"ok"}
#   2. GET /ready         200 {"status":"ready"} (else the failing checks are named)
#   3. POST /api/escrow   202: the CreateEscrow command is in the outbox (a fresh
#                         Idempotency-Key, so a re-run never replays an old answer)
#   4. the command on Kafka: GET /api/escrow/{id}/commands/{commandId} until ACCEPTED. The
#      worker that owns the escrow's partition learns of a command only by consuming it from
#      escrow-commands, so an ACCEPTED outcome shows the command went outbox -> Kafka ->
#      processor -> table; then GET /api/escrow/{id} shows the escrow (AWAIT_FUNDS).
#   5. GET /api/escrow/{id}/events until EscrowCreated: the event went escrow.events.v1 ->
#      the PostgreSQL mirror.
#   6. POST /api/escrow/{id}/cancel (SMOKE_CANCEL=0 skips): the smoke escrow ends CANCELLED,
#      and with payment effects on its PaymentIntent is cancelled; nobody can fund it.
#
# Environment: SMOKE_SELLER_ID (smoke-seller), SMOKE_BUYER_ID (service tokens only),
# SMOKE_RAIL (STRIPE), SMOKE_AMOUNT (10000), SMOKE_CURRENCY (USD), SMOKE_WAIT_S (60),
# SMOKE_CANCEL (1). Needs curl and python3. Exit 0 when every check passed, 1 at the
# first that failed, 2 on a usage error.
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 BASE_URL TOKEN" >&2
  exit 2
fi
BASE_URL=${1%/}
TOKEN=$2
SELLER=${SMOKE_SELLER_ID:-smoke-seller}
RAIL=${SMOKE_RAIL:-STRIPE}
AMOUNT=${SMOKE_AMOUNT:-10000}
CURRENCY=${SMOKE_CURRENCY:-USD}
WAIT_S=${SMOKE_WAIT_S:-60}
CANCEL=${SMOKE_CANCEL:-1}
for tool in curl python3; do
  command -v "$tool" >/dev/null || { echo "smoke: $tool is required" >&2; exit 2; }
done

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
AUTH_HEADER="$WORK/auth"
# the token goes to curl through a file, never on a command line (ps) or in the output
printf 'Authorization: Bearer %s\n' "$TOKEN" >"$AUTH_HEADER"
BODY="$WORK/body"

ok() { echo "ok    $*"; }
fail() {
  echo "FAIL  $*" >&2
  if [[ -s $BODY ]]; then echo "      answer: $(head -c 2000 "$BODY")" >&2; fi
  exit 1
}

# call METHOD PATH [JSON] [extra curl args...]: the HTTP status on stdout, the body in $BODY
call() {
  local method=$1 path=$2 data=${3:-}
  shift $(($# < 3 ? $# : 3))
  local args=(-sS -o "$BODY" -w '%{http_code}' -X "$method" -H "@$AUTH_HEADER"
    --max-time 35 "$@")
  if [[ -n $data ]]; then args+=(-H 'Content-Type: application/json' --data "$data"); fi
  rm -f "$BODY"
  curl "${args[@]}" "$BASE_URL$path" || true # no answer: curl writes 000
}

# field NAME: a top-level field of the JSON answer in $BODY (empty when absent or not JSON)
field() {
  python3 - "$1" "$BODY" <<'PY'
import json, sys
try:
    with open(sys.argv[2]) as f:
        value = json.load(f).get(sys.argv[1])
except (ValueError, AttributeError, OSError):
    value = None
print("" if value is None else value)
PY
}

# event_types: the eventType of every event in a /events answer in $BODY, one a line
event_types() {
  python3 - "$BODY" <<'PY'
import json, sys
try:
    with open(sys.argv[1]) as f:
        events = json.load(f).get("events") or []
except (ValueError, AttributeError, OSError):
    events = []
for event in events:
    print(event.get("eventType") or event.get("type") or "")
PY
}

deadline=$((SECONDS + WAIT_S))
still_time() { ((SECONDS < deadline)); }

# 1. health
status=$(call GET /health)
[[ $status == 200 && $(field status) == ok ]] || fail "GET /health answered $status"
ok "GET /health: ok ($(field timestamp))"

# 2. ready
status=$(call GET /ready)
[[ $status == 200 && $(field status) == ready ]] || fail "GET /ready answered $status"
ok "GET /ready: ready"

# 3. create
run="smoke-$(date -u +%Y%m%dT%H%M%SZ)-$RANDOM$RANDOM"
buyer_field=""
if [[ -n ${SMOKE_BUYER_ID:-} ]]; then buyer_field=",\"buyerId\":\"$SMOKE_BUYER_ID\""; fi
create="{\"offerId\":\"$run\",\"contractId\":\"$run\",\"rail\":\"$RAIL\",\"amount\":\"$AMOUNT\",\"currency\":\"$CURRENCY\",\"sellerId\":\"$SELLER\"$buyer_field}"
status=$(call POST /api/escrow "$create" -H "Idempotency-Key: $run")
[[ $status == 202 ]] || fail "POST /api/escrow answered $status"
escrow_id=$(field escrowId)
command_id=$(field commandId)
[[ -n $escrow_id && -n $command_id ]] || fail "POST /api/escrow: no escrowId/commandId"
ok "POST /api/escrow: 202, escrow $escrow_id, command $command_id"

# 4. the command consumed from Kafka by the escrow's owner, its outcome recorded
outcome=""
while still_time; do
  status=$(call GET "/api/escrow/$escrow_id/commands/$command_id")
  outcome=$(field status)
  [[ $status == 200 && $outcome != PENDING ]] && break
  sleep 1
done
[[ $outcome == ACCEPTED ]] || fail "command $command_id: ${outcome:-no outcome} after ${WAIT_S}s (HTTP $status)"
ok "command $command_id consumed from Kafka and ACCEPTED"
status=$(call GET "/api/escrow/$escrow_id")
[[ $status == 200 && $(field status) == AWAIT_FUNDS ]] ||
  fail "GET /api/escrow/$escrow_id answered $status"
ok "GET /api/escrow/$escrow_id: AWAIT_FUNDS"

# 5. the event mirrored into PostgreSQL
mirrored=""
while still_time; do
  status=$(call GET "/api/escrow/$escrow_id/events")
  if [[ $status == 200 ]] && event_types | grep -qx EscrowCreated; then
    mirrored=yes
    break
  fi
  sleep 1
done
[[ -n $mirrored ]] || fail "EscrowCreated of $escrow_id not in the mirror after ${WAIT_S}s"
ok "EscrowCreated of $escrow_id on escrow.events.v1 and in PostgreSQL"

# 6. leave nothing to pay
if [[ $CANCEL == 1 ]]; then
  status=$(call POST "/api/escrow/$escrow_id/cancel" '{}' -H "Prefer: wait=30" \
    -H "Idempotency-Key: $run-cancel")
  [[ $status == 200 && $(field status) == CANCELLED ]] ||
    fail "POST /api/escrow/$escrow_id/cancel answered $status"
  ok "smoke escrow $escrow_id cancelled"
fi
echo "smoke: all checks passed against $BASE_URL"
