#!/usr/bin/env bash
# Builds the Debian package (target/debian/grove_VERSION_ARCH.deb) with cargo-deb, installing
# cargo-deb first if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null 2>&1 || cargo install --locked cargo-deb
cargo deb -p grove "$@"
ls -l target/debian/*.deb
