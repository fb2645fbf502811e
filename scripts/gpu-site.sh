# Sourced by the GPU scripts: once per machine, unpack the carried .gpu/*.txz site packages (flash-attn,
# bitsandbytes) into /tmp/site and install this checkout without dependencies (the machine reaches no registry).
mkdir -p /tmp/site
shopt -s nullglob
if [[ ! -f /tmp/site/.llmopt-ready ]]; then
    for site in .gpu/*.txz; do tar xJf "$site" -C /tmp/site || exit 1; done
    python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null || exit 1
    touch /tmp/site/.llmopt-ready
fi
