#!/usr/bin/env bash
# The default test run's wall time, this checkout against an earlier commit, side by side (issue 16).
# Both run the README's test command (`python -m pytest`, each commit's own pytest settings) with the same
# environment, one after the other, alone on the machine. The earlier commit is checked out in a temporary
# git worktree and imported from there (PYTHONPATH), so one installed environment serves both.
#   bash benchmarks/bench_test_suite.sh [BASE_COMMIT=f2f22bb] [REPEATS=1]
set -euo pipefail
BASE=${1:-f2f22bb}
REPEATS=${2:-1}
PY=${PYTHON:-$PWD/.venv/bin/python}
# both checkouts find ../shared (the CIFAR-10 tests), although the worktree is not beside it
export HUB_CCROP_SHARED=${HUB_CCROP_SHARED:-$(cd .. && pwd)/shared}
WORKTREE=$(mktemp -d)/base
git worktree add -q --detach "$WORKTREE" "$BASE"
trap 'git worktree remove --force "$WORKTREE"' EXIT

time_suite() {  # time_suite DIR LABEL: prints "LABEL <seconds> <pytest's last line>"
  local dir=$1 label=$2 start end last
  start=$(date +%s.%N)
  # a failing test must not stop the comparison: its summary line says so
  last=$(cd "$dir" && { PYTHONPATH=$dir "$PY" -m pytest -q -p no:cacheprovider 2>&1 || true; } | tail -n 1)
  end=$(date +%s.%N)
  printf '%-10s %6.1f s   %s\n' "$label" "$(echo "$end - $start" | bc)" "$last"
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for _ in $(seq "$REPEATS"); do
  time_suite "$WORKTREE" "$BASE"
  time_suite "$PWD" "$(git rev-parse --short HEAD)"
done
