#!/usr/bin/env bash
# The whole suite matrix on a CUDA machine, one model at a time, each run stopped (SIGINT: pytest still
# writes its summary and the report) when its time is up. Writes $OUT/NAME.log, .json (report), .xml.
# Usage: OUT=results [SUITES="suites/test_a.py ..."] [TAG=name] scripts/gpu-matrix.sh SECONDS MODEL [pytest arguments...]
set -uo pipefail
out=${OUT:-gpu-results}
seconds=$1 model=$2
shift 2
mkdir -p "$out"
source "$(dirname "$0")/gpu-site.sh"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
    python3 -c 'import flash_attn; print("flash-attn", flash_attn.__version__)' 2>&1 | tail -1
    python3 -c 'import bitsandbytes; print("bitsandbytes", bitsandbytes.__version__)' 2>&1 | tail -1
} > "$out/stack.txt"
name=${TAG:-${model//\//_}}
read -ra paths <<< "${SUITES:-suites}"
start=$SECONDS
timeout -s INT -k 20 "$seconds" python3 -m pytest "${paths[@]}" -p no:cacheprovider -rfsxX --durations=40 \
    "--llmopt-model=$model" --llmopt-device=cuda "--llmopt-report=$out/$name.json" \
    "--junitxml=$out/$name.xml" -o junit_family=xunit1 "$@" > "$out/$name.log" 2>&1
echo "$model: exit $?, wall $((SECONDS - start)) s" | tee -a "$out/walls.txt"
tail -n 45 "$out/$name.log"
