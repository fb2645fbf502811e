#!/usr/bin/env bash
# The suites on every built-in model under another transformers release, on a CUDA machine (the release sweep of
# baselines/cpu-x86_64/transformers-releases.md, on the GPU). The release's wheels (transformers, and what it needs
# in versions the machine lacks: tokenizers, huggingface_hub) lie in .whl/REL and are installed into /tmp/tf-REL,
# ahead of the machine's own; .gpu carries flash-attn and bitsandbytes as for scripts/gpu-matrix.sh.
# Usage: OUT=results scripts/gpu-release-sweep.sh REL SECONDS [pytest arguments...]  (carry .gpu and .whl)
# Writes $OUT/REL.log, $OUT/REL.json (report) and $OUT/REL-stack.txt.
set -uo pipefail
out=${OUT:-gpu-results}
rel=$1 seconds=$2
shift 2
mkdir -p "$out"
source "$(dirname "$0")/gpu-site.sh"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "/tmp/tf-$rel" .whl/"$rel"/*.whl >/dev/null || exit 1
export PYTHONPATH=/tmp/tf-$rel:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c 'import torch, transformers, tokenizers; print("torch", torch.__version__, "transformers", transformers.__version__, "tokenizers", tokenizers.__version__, torch.cuda.get_device_name())' > "$out/$rel-stack.txt" 2>&1
read -ra models <<< "$(python3 -c 'from pytest_llmopt import zoo; print(" ".join("--llmopt-model=" + m for m in zoo.TINY))')"
start=$SECONDS
timeout -s INT -k 30 "$seconds" python3 -m pytest suites -p no:cacheprovider --ignore=suites/test_performance.py -q -rfEX --tb=short \
    --llmopt-device=cuda "${models[@]}" "--llmopt-report=$out/$rel${TAG:+-$TAG}.json" "$@" > "$out/$rel${TAG:+-$TAG}.log" 2>&1
echo "transformers $rel ${TAG:-}: exit $?, wall $((SECONDS - start)) s" | tee -a "$out/walls.txt"
cat "$out/$rel-stack.txt"
grep -E "^(FAILED|ERROR)" "$out/$rel${TAG:+-$TAG}.log" | head -60
tail -n 3 "$out/$rel${TAG:+-$TAG}.log"
