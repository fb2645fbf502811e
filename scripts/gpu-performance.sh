#!/usr/bin/env bash
# The speed protocol on a CUDA machine (issue 28): sessions of the performance suite appended to baselines under
# $OUT/baselines, one more judged against them (A/A), the independent measurement, injected faults; then the
# agreement table. Run from the repository root (flash-attn / bitsandbytes on PYTHONPATH: scripts/gpu-site.sh).
# Usage: OUT=results [MODELS="llama-1b-shape llama-7b-shape"] [BUDGET=100] [BUNDLE=file.tar] [SESSION_K=...] [FAULT_K="test_generate_speed and compile"]
#        scripts/gpu-performance.sh STEP...
#   session   a session appended to the baselines (--llmopt-update-baselines): run it 3 times for a pooled baseline
#   judge     a session judged against them (no update): an A/A comparison, no regression expected
#             (SESSION_K, a -k expression, narrows sessions and judges, e.g. "throughput" for the request-mix checks)
#   independent   scripts/measure-speed.py, interleaved
#   gpu-work:PCT  | host:MS@TEXT | compile-off   a judged session with that fault (scripts/perf_fault_plugin.py),
#                 on the first model only; each must fail on the figure it slows. FAULT_K (a -k expression) narrows
#                 these sessions to some checks: a smaller campaign, so more tries fit; a step named
#                 again is another try (fault-NAME-2.json, ...)
#   table     scripts/compare-speed.py of the last two session reports (and the independent one)
set -uo pipefail
out=${OUT:-gpu-performance}
mkdir -p "$out"
[[ -f scripts/gpu-site.sh ]] && source scripts/gpu-site.sh
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
read -ra models <<< "${MODELS:-llama-1b-shape llama-7b-shape}"
flags=(suites/test_performance.py -p no:cacheprovider -rfsxX --durations=0 --llmopt-variants=quant=none
       "--llmopt-baselines=$out/baselines" "--llmopt-speed-budget=${BUDGET:-100}")
model_flags() { for m in "$@"; do printf -- '--llmopt-model=%s\n' "$m"; done; }
[[ -f $out/stack.txt ]] || {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
} > "$out/stack.txt" 2>&1
shopt -s nullglob  # (gpu-site.sh sets it too: an unmatched "ls GLOB" would then list the current directory)
sessions=("$out"/session-*.json)
n=${#sessions[@]}
for step in "$@"; do
    start=$SECONDS
    case $step in
        session) n=$((n + 1)); python3 -m pytest "${flags[@]}" $(model_flags "${models[@]}") --llmopt-update-baselines \
                     ${SESSION_K:+-k "$SESSION_K"} --llmopt-report="$out/session-$n.json" > "$out/session-$n.log" 2>&1 ;;
        judge) n=$((n + 1)); python3 -m pytest "${flags[@]}" $(model_flags "${models[@]}") \
                     ${SESSION_K:+-k "$SESSION_K"} --llmopt-report="$out/session-$n.json" > "$out/session-$n.log" 2>&1 ;;
        independent) python3 scripts/measure-speed.py $(printf -- '--shape %s ' "${models[@]}") --new-tokens 32 --rounds 12 \
                     --out "$out/independent.json" > "$out/independent.log" 2>&1 ;;
        gpu-work:*|host:*|compile-off)
            name=${step//[^A-Za-z0-9_.-]/_}
            base=$name try=1
            while [[ -e $out/fault-$name.log ]]; do try=$((try + 1)) name=$base-$try; done
            fault=$step; [[ $step == host:* ]] && fault=decode-delay:${step#host:}
            LLMOPT_PERF_FAULT=$fault LLMOPT_PERF_FAULT_BASELINE=$(ls "$out"/baselines/*/"${models[0]}".json | head -1) \
                PYTHONPATH=scripts:$PYTHONPATH python3 -m pytest "${flags[@]}" $(model_flags "${models[0]}") -p perf_fault_plugin \
                ${FAULT_K:+-k "$FAULT_K"} --llmopt-report="$out/fault-$name.json" > "$out/fault-$name.log" 2>&1 ;;
        table) last=$(ls -v "$out"/session-*.json | tail -2)
               python3 scripts/compare-speed.py $last $([[ -f $out/independent.json ]] && echo "$out/independent.json") > "$out/agreement.md" ;;
    esac
    echo "step $step: exit $?, wall $((SECONDS - start)) s" | tee -a "$out/walls.txt"
done
# The device returns a limited number of files, none in deep folders: BUNDLE=FILE packs everything into one tar
[[ -n ${BUNDLE:-} ]] && tar cf "$BUNDLE" -C "$out" --exclude="$(basename "$BUNDLE")" .
exit 0
