#!/usr/bin/env bash
# Builds the Debian package (target/debian/grove_VERSION_ARCH.deb) with cargo-deb, installing
# cargo-deb first if it is missing. The manual page comes from the same definitions as --help.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null 2>&1 || cargo install --locked cargo-deb
cargo build --release -p grove
mkdir -p target/man
target/release/grove man | gzip -9n > target/man/grove.1.gz
cargo deb -p grove --no-build --strip "$@"
ls -l target/debian/*.deb
