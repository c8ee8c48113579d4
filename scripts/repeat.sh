#!/usr/bin/env bash
# Run one fault test N times in a row, each in its own directory, and print one line per
# run: its result, how long it took, and the summary line the test printed.  A test that
# fails once in N is a bug to find: the run's directory keeps its workers' logs.
#
#   scripts/repeat.sh N TEST [pytest args...]
#   scripts/repeat.sh 10 tests/chaos/test_kill9.py
#   CHAOS_PROCESSING_GUARANTEE=at_least_once scripts/repeat.sh 3 tests/chaos/test_rebalance.py
#
# Runs in $REPEAT_DIR (default /tmp/escrow-repeat/<test name>); the stack must be up.
set -uo pipefail
cd "$(dirname "$0")/.."

n=${1:?usage: scripts/repeat.sh N TEST [pytest args...]}
test=${2:?usage: scripts/repeat.sh N TEST [pytest args...]}
shift 2
dir=${REPEAT_DIR:-/tmp/escrow-repeat/$(basename "$test" .py)}
mkdir -p "$dir"
failed=0
for i in $(seq 1 "$n"); do
  rm -rf "$dir/$i"
  started=$(date +%s)
  .venv/bin/python -m pytest -q -p no:cacheprovider -s "$test" --basetemp="$dir/$i" "$@" \
    >"$dir/$i.out" 2>&1
  rc=$?
  [ $rc -eq 0 ] || failed=$((failed + 1))
  summary=$(grep -h -m1 -E '^(chaos|rebalance) \(' "$dir/$i.out" | cut -c1-300)
  echo "run $i/$n rc=$rc $(( $(date +%s) - started ))s $(date -u +%H:%M) ${summary}"
done
echo "$((n - failed))/$n passed; output in $dir"
[ $failed -eq 0 ]
