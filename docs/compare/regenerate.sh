#!/usr/bin/env bash
# Regenerates every run shown in README.md and docs/compare.md: results.json, the PNGs and the printed
# table (table.txt) in each folder below. Usage: bash docs/compare/regenerate.sh [NAME ...]
# (default: all; NAME from the list below). Runs with the repository's .venv (make build first).
# One CPU thread per run, one run at a time: on 2 CPU cores the whole set takes about 35 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
MAS=${MAS:-.venv/bin/mas-local}
declare -A RUNS=(
  [default]="--out docs/compare"
  [two-tasks]="--tasks 2 --out docs/compare/two-tasks"
  [split]="--benchmark split --out docs/compare/split"
  [rotated]="--benchmark rotated --out docs/compare/rotated"
  [cnn]="--model cnn --out docs/compare/cnn"
  [transformer]="--model transformer --out docs/compare/transformer"
  [transformer-split]="--model transformer --benchmark split --out docs/compare/transformer-split"
  [transformer-two-tasks]="--model transformer --tasks 2 --out docs/compare/transformer-two-tasks"
)
ORDER=(default two-tasks split rotated cnn transformer transformer-split transformer-two-tasks)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=("${ORDER[@]}")
for name in "${names[@]}"; do
  args=${RUNS[$name]:?"unknown run $name; choose from ${ORDER[*]}"}
  out=${args##*--out }
  mkdir -p "$out"
  echo "== $name: mas-local compare $args" >&2
  # shellcheck disable=SC2086
  $MAS compare $args --quiet | tee "$out/table.txt.tmp"
  mv "$out/table.txt.tmp" "$out/table.txt"
done
