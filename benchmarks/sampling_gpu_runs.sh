#!/usr/bin/env bash
# The GPU runs behind the sampling figures of docs/sampling.md (Llama-3-8B shape, random bf16 weights). Steps,
# comma-separated, so that a call fits the device tool's 10-minute limit; OUT: where the results go.
#
#   kernels         sampler tests compiled (tests/engine/test_sampler.py), sampler_bench, engine_bench's decode figures
#                   greedy vs sampled, with the card's copy bandwidth and GEMM rate (~4 min)
#   replay-chat     niyama replay azure-conv 20 QPS x 1200 requests, chat sampling (t 0.7, top_p 0.9) (~2.5 min)
#   replay-greedy   the same, greedy (~2.5 min)
#   fidelity-chat   benchmarks/fidelity.py at azure-conv 17.8 QPS with chat sampling (~2 min)
#   profile         niyama profile, 300 shapes, the serving sampling mix (~2.5 min)
#
#   bash benchmarks/sampling_gpu_runs.sh kernels,replay-chat OUT
set -uo pipefail
out=$2
mkdir -p "$out"
export PYTHONUNBUFFERED=1
engine=(--model llama-3-8b --load-format dummy --device cuda)
logs=/tmp/sampling-logs       # logs stay there (their tails are printed): the tool brings back 8 files at most
mkdir -p "$logs"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.mem --format=csv | tee -a "$out/gpu.txt"

replay() {     # replay SAMPLING
    timeout 220 python3 -m niyama.cli replay "${engine[@]}" --trace azure-conv --qps 20 --requests 1200 \
        --sampling "$1" --out "/tmp/replay-$1" --quiet > "$logs/replay-$1.log" 2>&1
    tail -14 "$logs/replay-$1.log"
    cp "/tmp/replay-$1/steps.csv" "$out/steps-$1.csv"
    cp "/tmp/replay-$1/summary.json" "$out/summary-$1.json"
}

for step in ${1//,/ }; do
    echo "=== $step ($(date +%T))"
    case $step in
    kernels)
        timeout 150 python3 -m pytest -q tests/engine/test_sampler.py -p no:cacheprovider 2>&1 | tail -25
        skip_old=--skip-old                 # the per-row sampler's baseline (slow) only with OLD=1
        [ -n "${OLD:-}" ] && skip_old=
        timeout 150 python3 benchmarks/sampler_bench.py $skip_old --out "$out/sampler_bench.json" \
            > "$logs/sampler_bench.log" 2>&1
        tail -57 "$logs/sampler_bench.log"
        timeout 200 python3 benchmarks/engine_bench.py --sections ceilings,decode --skip-hf --skip-offline \
            --out "$out/engine_bench.json" > "$logs/engine_bench.log" 2>&1
        tail -22 "$logs/engine_bench.log"
        ;;
    replay-chat) replay chat ;;
    replay-greedy) replay greedy ;;
    fidelity-chat)
        timeout 170 python3 benchmarks/fidelity.py "${engine[@]}" --profile h100-llama3-8b --point azure-conv:17.8 \
            --minutes 0.75 --sampling chat --tag h100-llama3-8b-chat --out /tmp/fidelity 2>&1 | tail -12
        cp /tmp/fidelity/fidelity_h100-llama3-8b-chat.json "$out/"
        cp /tmp/fidelity/fidelity_runs/azure-conv-17.8-chat/replay/steps.csv "$out/steps-fidelity-chat.csv"
        ;;
    profile)
        timeout 300 python3 -m niyama.cli profile "${engine[@]}" --shapes 300 --repeats 3 --out "$out/profile.csv" \
            --quiet 2>&1 | tail -3
        ;;
    *)
        echo "unknown step $step" >&2
        exit 2
        ;;
    esac
done
