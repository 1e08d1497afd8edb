#!/usr/bin/env bash
# Build the peers' benchmark virtualenvs (.bench-venv/NAME) from bench/peers_requirements.txt,
# one per "# [venv NAME]" section; camelid's .venv is never touched.
#   bash bench/peers_env.sh [NAME ...]        (default: every section)
# A venv whose requirements did not change is left as it is. A section pip cannot install is
# recorded in .bench-venv/NAME.failed (pip's error), which bench/peers_bench.py reports in its
# table and JSON; the script goes on with the other sections and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ROOT=${CAMELID_BENCH_VENV:-.bench-venv}
REQ=bench/peers_requirements.txt
# No visible GPU -> pin the CPU wheel of torch (as the Makefile does for camelid's venv).
CONSTRAINT=$(nvidia-smi -L >/dev/null 2>&1 || echo "-c constraints-cpu.txt")

if [ $# -gt 0 ]; then names=("$@"); else
  mapfile -t names < <(sed -n 's/^# \[venv \(.*\)\]$/\1/p' "$REQ")
fi
mkdir -p "$ROOT"
for name in "${names[@]}"; do
  venv=$ROOT/$name
  reqs=$ROOT/$name.requirements
  awk -v n="$name" '/^# \[venv /{on = ($0 == "# [venv " n "]"); next} on && !/^#/ && NF' "$REQ" >"$reqs"
  if [ ! -s "$reqs" ]; then echo "$REQ has no section [venv $name]" >&2; exit 2; fi
  stamp=$venv/.peers-installed
  if [ -f "$stamp" ] && cmp -s "$reqs" "$stamp"; then echo "$venv: up to date"; continue; fi
  rm -f "$ROOT/$name.failed"
  echo "$venv: installing $(grep -v '^torch' "$reqs" | sed 's/ *#.*//' | tr '\n' ' ')..."
  if { [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"; } \
    && "$venv/bin/python" -m pip install -q --upgrade pip >"$ROOT/$name.log" 2>&1 \
    && "$venv/bin/python" -m pip install $CONSTRAINT -r "$reqs" >>"$ROOT/$name.log" 2>&1; then
    cp "$reqs" "$stamp"
    echo "$venv: ready"
  else
    { echo "pip could not install [venv $name] of $REQ:"
      grep -E '^(ERROR|    [a-zA-Z].* depends on|  +The user requested)' "$ROOT/$name.log" | head -8
    } >"$ROOT/$name.failed"
    echo "$venv: FAILED, see $ROOT/$name.log"; cat "$ROOT/$name.failed"
  fi
done
exit 0
