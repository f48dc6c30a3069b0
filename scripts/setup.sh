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
