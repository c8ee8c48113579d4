#!/usr/bin/env bash
# Command-line tools the tests use that are not Python packages, into .stack/bin/:
#   promtool  checks deploy/prometheus/alerts.yml and the dashboard's queries, and runs the
#             alert rules' unit tests (tests/integration/test_observability.py).
# Taken from Debian's `prometheus` package without installing it (that would start a
# Prometheus server): `apt-get download` + `dpkg-deb -x`, about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN_DIR="${STACK_DIR:-.stack}/bin"
mkdir -p "$BIN_DIR"

say() { echo "tools: $*"; }
die() { echo "tools: ERROR: $*" >&2; exit 1; }

install_promtool() {
  local target="$BIN_DIR/promtool"
  if [[ -x "$target" ]]; then say "promtool present ($("$target" --version 2>&1 | head -n1))"; return; fi
  command -v apt-get >/dev/null || die "promtool: need apt-get (or put promtool in $target)"
  local tmp
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' RETURN
  if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
    [[ $(id -u) == 0 ]] || die "promtool: apt-get download failed and apt-get update needs root"
    apt-get -o DPkg::Lock::Timeout=300 -q update >/dev/null 2>&1 || true
    (cd "$tmp" && apt-get download prometheus) || die "promtool: apt-get download prometheus failed"
  fi
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
  install -m 0755 "$tmp/root/usr/bin/promtool" "$target"
  say "promtool installed ($("$target" --version 2>&1 | head -n1))"
}

install_promtool
