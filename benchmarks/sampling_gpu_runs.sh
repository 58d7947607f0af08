#!/usr/bin/env bash
# The GPU runs behind the sampling figures of docs/sampling.md (Llama-3-8B shape, random bf16 weights), in
# two calls that each fit the device tool's 10-minute limit. OUT: where the results go.
#
#   bash benchmarks/sampling_gpu_runs.sh kernels OUT   # sampler tests compiled, sampler_bench, engine_bench's
#                                                      # decode figures greedy vs sampled
#   bash benchmarks/sampling_gpu_runs.sh profile OUT   # niyama profile with the serving sampling mix
#   bash benchmarks/sampling_gpu_runs.sh serving OUT   # replay azure-conv 20 QPS x 1200 greedy and chat, and the
#                                                      # fidelity point azure-conv 17.8 with chat sampling
set -uo pipefail
phase=$1
out=$2
mkdir -p "$out"
export PYTHONUNBUFFERED=1
engine=(--model llama-3-8b --load-format dummy --device cuda)
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.mem --format=csv | tee "$out/$phase.gpu.txt"

case $phase in
kernels)
    timeout 150 python3 -m pytest -q -x tests/test_sampler.py -p no:cacheprovider 2>&1 | tail -4
    timeout 150 python3 benchmarks/sampler_bench.py --out "$out/sampler_bench.json" > "$out/sampler_bench.log" 2>&1
    tail -42 "$out/sampler_bench.log"
    timeout 200 python3 benchmarks/engine_bench.py --sections ceilings,decode --skip-hf --skip-offline \
        --out "$out/engine_bench.json" > "$out/engine_bench.log" 2>&1
    tail -26 "$out/engine_bench.log"
    ;;
profile)
    timeout 300 python3 -m niyama.cli profile "${engine[@]}" --shapes 400 --repeats 3 --out "$out/profile.csv" \
        --quiet 2>&1 | tail -3
    ;;
serving)
    for sampling in greedy chat; do
        timeout 200 python3 -m niyama.cli replay "${engine[@]}" --trace azure-conv --qps 20 --requests 1200 \
            --sampling "$sampling" --out "/tmp/replay-$sampling" --quiet > "$out/replay-$sampling.log" 2>&1
        tail -14 "$out/replay-$sampling.log"
        cp "/tmp/replay-$sampling/steps.csv" "$out/steps-$sampling.csv"
        cp "/tmp/replay-$sampling/summary.json" "$out/summary-$sampling.json"
    done
    timeout 170 python3 benchmarks/fidelity.py "${engine[@]}" --profile h100-llama3-8b --point azure-conv:17.8 \
        --minutes 0.75 --sampling chat --tag h100-llama3-8b-chat --out /tmp/fidelity 2>&1 | tail -12
    cp /tmp/fidelity/fidelity_h100-llama3-8b-chat.json "$out/"
    ;;
*)
    echo "phase must be kernels, profile or serving" >&2
    exit 2
    ;;
esac
