#!/usr/bin/env bash
# Proof of power on a GPU: inject each attention fault of tests/faults.py into the attention suite's logits
# check on a model, and show that it fails (the CPU version is tests/test_faults.py).
# Usage: OUT=results scripts/gpu-faults.sh --llmopt-model=llama-7b-shape [pytest arguments...]
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
for fault in sdpa_scale_off padding_mask_dropped_by_sdpa; do
    echo "== fault: $fault"
    LLMOPT_INJECT_FAULT=$fault PYTHONPATH=tests${PYTHONPATH:+:$PYTHONPATH} python3 -m pytest suites/test_attention.py \
        -p fault_plugin -p no:cacheprovider -q -k test_logits_match_eager --llmopt-variants='attention=sdpa,flash_attention_2' \
        --llmopt-report="$out/fault-$fault.json" "$@" 2>&1 | grep -E "floor|mean_rms|passed|failed" | tee "$out/fault-$fault.log"
done
