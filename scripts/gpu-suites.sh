#!/usr/bin/env bash
# Run the suites on a CUDA machine that reaches no package registry (how the H100 figures in
# baselines/ were made). Wheels it needs (flash-attn, bitsandbytes) are read from .gpu/ if present, as
# wheels or as xz-compressed site folders (*.txz: a wheel's contents, a third of the size; see NOTES.md).
# Usage: OUT=results scripts/gpu-suites.sh [pytest arguments...]
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
shopt -s nullglob
wheels=(.gpu/*.whl)
sites=(.gpu/*.txz)
mkdir -p /tmp/site
if ((${#wheels[@]})); then
    python3 -m pip install -q --no-deps --no-index --no-compile --target /tmp/site "${wheels[@]}" || exit 1
fi
for site in "${sites[@]}"; do
    tar xJf "$site" -C /tmp/site || exit 1
done
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null || exit 1
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
    python3 -c 'import flash_attn; print("flash-attn", flash_attn.__version__)' 2>/dev/null || echo "flash-attn not installed"
    env | grep -E '^(TORCH|TORCHINDUCTOR|CUDA|NCCL)_' | sort
} | tee "$out/stack.txt"
export PYTHONUNBUFFERED=1
python3 -m pytest suites -p no:cacheprovider -rfsxX --durations=25 --junitxml="$out/junit.xml" -o junit_family=xunit1 "$@" 2>&1 | tee "$out/pytest.log"
exit "${PIPESTATUS[0]}"
