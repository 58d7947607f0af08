#!/usr/bin/env bash
# The same HTTP load on `niyama serve` with the engine in its own process (the default) and on a thread of
# the HTTP process (--in-process-engine): what sharing the GIL with HTTP costs the engine's steps.
#   bash benchmarks/serve_modes.sh OUT_DIR [niyama serve args...]      e.g. on a GPU:
#   bash benchmarks/serve_modes.sh /tmp/modes --model llama-3-8b --load-format dummy --device cuda
# Load: TRACE (azure-conv), QPS (6), REQUESTS (300), BENCH_ARGS (more `niyama bench serve` flags). Writes OUT_DIR/<mode>/{summary.json,metrics.txt}.
set -euo pipefail
out=$1; shift
port=$((20000 + RANDOM % 20000))
for mode in process thread; do
  extra=(); [ "$mode" = thread ] && extra=(--in-process-engine)
  mkdir -p "$out/$mode"
  export TRITON_CACHE_DIR="$out/$mode/triton-cache"
  rm -rf "$TRITON_CACHE_DIR"; mkdir -p "$TRITON_CACHE_DIR"
  python -m niyama.cli serve --port "$port" --log-level warning "$@" "${extra[@]}" > "$out/$mode/serve.log" 2>&1 &
  pid=$!
  until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do
    kill -0 $pid 2> /dev/null || { cat "$out/$mode/serve.log"; exit 1; }; sleep 1
  done
  find "$TRITON_CACHE_DIR" -name '*.json' | sort > "$out/$mode/kernels_at_ready.txt"
  python -m niyama.cli bench serve --url "http://127.0.0.1:$port" --trace "${TRACE:-azure-conv}" --qps "${QPS:-6}" \
    --requests "${REQUESTS:-300}" ${BENCH_ARGS:-} --out "$out/$mode" --quiet | tail -12
  curl -s "http://127.0.0.1:$port/metrics" | grep -E '^niyama:(iteration_duration_seconds_(sum|count)|tier_violations_total|relegations_total)' \
    | tee "$out/$mode/metrics.txt"
  kill $pid; wait $pid || true
  find "$TRITON_CACHE_DIR" -name '*.json' | sort | comm -13 "$out/$mode/kernels_at_ready.txt" - \
    | grep -v __grp__ | xargs -r python -c '
import json, sys
for f in sys.argv[1:]:
    m = json.load(open(f)); print("  compiled after ready:", m.get("name"), {k: v for k, v in m.items() if k in ("constants", "num_warps", "num_stages")})' \
    | tee "$out/$mode/kernels_after_ready.txt" || true
  echo "== $mode: mean step $(awk '/_sum/{s=$2} /_count/{c=$2} END{printf "%.2f ms over %d steps", 1000*s/c, c}' "$out/$mode/metrics.txt")"
done
