#!/usr/bin/env bash
# Long CPU measurements in the background, resumable: every line of PLAN ("RUN_ID VAT_X=value ...", "#" comments)
# is one job run through the CLI (python -m job, the project's .venv) from a snapshot of the job's code taken at the
# first start (OUT_DIR/code, so later edits do not change a measurement under way), JOBS at a time with THREADS
# torch threads each, at nice 19 so that other work on the machine goes first. A run cut short resumes from its
# last checkpoint when the script is started again with the same OUT_DIR (its log, OUT_DIR/logs/RUN_ID.log, grows
# by the resumed part); a finished one is not trained again. To stop a stream, end the script and its xargs first
# (otherwise xargs starts the plan's next line), then send SIGTERM to the running job: it checkpoints and exits 5.
# usage: [JOBS=1] [THREADS=2] bench/cpu_runs.sh PLAN OUT_DIR     (MNIST: VAT_DATA_DIR, default ../shared/mnist)
# then:  bench/protocol_lines.py OUT_DIR/runs/<RUN_ID> ...       (raw lines and mean +- std)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
plan=$(realpath "$1"); out=$(realpath -m "$2"); mkdir -p "$out/code" "$out/logs"
[ -e "$out/code/job" ] || git -C "$repo" archive HEAD job pyproject.toml | tar -x -C "$out/code"
export OUT="$out" PYTHON="$repo/.venv/bin/python" THREADS="${THREADS:-2}"
export DATA="${VAT_DATA_DIR:-$(realpath "$repo/../shared/mnist")}"
grep -v '^\s*\(#\|$\)' "$plan" | xargs -P "${JOBS:-1}" -L 1 bash -c '
  id=$0; cd "$OUT/code"
  env "$@" VAT_RUN_ID="$id" VAT_DATA_DIR="$DATA" VAT_OUTPUT_DIR="$OUT/runs" VAT_LOG_FORMAT=json \
    OMP_NUM_THREADS="$THREADS" nice -n 19 "$PYTHON" -m job >> "$OUT/logs/$id.log" 2>&1 && rc=0 || rc=$?
  echo "$id rc=$rc $(date -u +%FT%TZ)" >> "$OUT/finished.txt"'
