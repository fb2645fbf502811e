#!/usr/bin/env bash
# The performance suite on a CUDA machine, twice, and the independent measurement; then the agreement table.
# Run from the repository root (flash-attn / bitsandbytes on PYTHONPATH as for scripts/gpu-suites.sh).
# Usage: OUT=results scripts/gpu-performance.sh [1] [2] [3]   (steps: 1 = run writing baselines into
# $OUT/baselines, 2 = run comparing with them, 3 = scripts/measure-speed.py; default all three, then the table;
# 4, 5 = the 1B shape's generate checks against those baselines with compile silently off / a 5 ms delay
# in every decoding step: both must FAIL naming metric, baseline, measured value and tolerance)
set -uo pipefail
out=${OUT:-gpu-performance}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
steps=${*:-1 2 3}
suite=(suites/test_performance.py -p no:cacheprovider -rfsxX --durations=0
       --llmopt-model=llama-1b-shape --llmopt-model=llama-7b-shape --llmopt-variants=quant=none
       "--llmopt-baselines=$out/baselines")
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
} > "$out/stack.txt" 2>&1
for step in $steps; do
    start=$SECONDS
    case $step in
        1) python3 -m pytest "${suite[@]}" --llmopt-update-baselines --llmopt-report="$out/run1.json" --benchmark-json="$out/bench1.json" > "$out/run1.log" 2>&1 ;;
        2) python3 -m pytest "${suite[@]}" --llmopt-report="$out/run2.json" --benchmark-json="$out/bench2.json" > "$out/run2.log" 2>&1 ;;
        4) LLMOPT_PERF_FAULT=compile-off PYTHONPATH=scripts:$PYTHONPATH python3 -m pytest "${suite[@]}" -p perf_fault_plugin \
               -k "test_generate_speed and llama-1b" > "$out/fault-compile-off.log" 2>&1 ;;
        5) LLMOPT_PERF_FAULT=decode-delay:5 PYTHONPATH=scripts:$PYTHONPATH python3 -m pytest "${suite[@]}" -p perf_fault_plugin \
               -k "test_generate_speed and llama-1b" > "$out/fault-decode-delay.log" 2>&1 ;;
        3) python3 scripts/measure-speed.py --shape llama-1b-shape --shape llama-7b-shape --new-tokens 64 --repeats 5 --out "$out/independent.json" > "$out/independent.log" 2>&1 ;;
    esac
    echo "step $step: exit $?, wall $((SECONDS - start)) s" | tee -a "$out/walls.txt"
done
if [[ -f $out/run1.json && -f $out/run2.json ]]; then
    python3 scripts/compare-speed.py "$out/run1.json" "$out/run2.json" $([[ -f $out/independent.json ]] && echo "$out/independent.json") | tee "$out/agreement.md"
fi
tail -n 30 "$out"/run*.log "$out"/fault-*.log 2>/dev/null
