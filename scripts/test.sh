#!/usr/bin/env bash
# Runs the whole grove test suite: formatting, lints, build, and every unit, property and
# end-to-end test of the workspace. The end-to-end tests start the real `grove` binary and
# drive it with independent NBD clients, so those clients must be installed:
#
#   qemu-io, qemu-img  (qemu-utils)     nbdinfo, nbdcopy  (libnbd-bin)
#   fio with the nbd ioengine (fio)     nbdkit            (nbdkit)
#   iscsi-test-cu, iscsi-inq, ... (libiscsi-bin)
#   qemu's iSCSI driver (qemu-block-extra, the same version as qemu-utils)
#
# Run as root on Debian/Ubuntu, it installs whatever is missing with apt-get (and a Rust
# toolchain with rustup if there is none). Run as another user, it lists exactly what is
# missing and exits with status 2.
#
# Usage: scripts/test.sh
# Environment:
#   GROVE_TEST_NO_INSTALL=1   never install anything, only report what is missing
#   CARGO_TEST_ARGS="..."     extra arguments for `cargo test` (e.g. a test name filter)
#   GROVE_TEST_STEP_TIMEOUT_SECONDS=600    time limit of each test step
#   GROVE_TEST_NO_FUZZ=1      skip the short fuzz run
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '==> %s\n' "$*"; }
fail() { printf 'error: %s\n' "$*" >&2; exit 2; }

# Each entry is "command:debian-package".
REQUIRED_TOOLS=(
  "qemu-io:qemu-utils"
  "qemu-img:qemu-utils"
  "nbdinfo:libnbd-bin"
  "nbdcopy:libnbd-bin"
  "nbdkit:nbdkit"
  "iscsi-test-cu:libiscsi-bin"
  "iscsi-inq:libiscsi-bin"
  "fio:fio"
  "promtool:prometheus"
  "curl:curl"
  "systemd-analyze:systemd"
  "cc:build-essential"
)

missing_packages() {
  local entry tool package
  for entry in "${REQUIRED_TOOLS[@]}"; do
    tool="${entry%%:*}"
    package="${entry##*:}"
    command -v "$tool" >/dev/null 2>&1 || echo "$package"
  done | sort -u
}

can_install() {
  [ "$(id -u)" -eq 0 ] && [ "${GROVE_TEST_NO_INSTALL:-0}" != 1 ] && command -v apt-get >/dev/null 2>&1
}

# --- 1. System packages -------------------------------------------------------------------
mapfile -t missing < <(missing_packages)
if [ "${#missing[@]}" -gt 0 ]; then
  if can_install; then
    say "installing missing packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
    mapfile -t missing < <(missing_packages)
    [ "${#missing[@]}" -eq 0 ] || fail "still missing after apt-get install: ${missing[*]}"
  else
    {
      echo "error: the end-to-end tests need these Debian packages, which are not installed:"
      for package in "${missing[@]}"; do
        tools=""
        for entry in "${REQUIRED_TOOLS[@]}"; do
          [ "${entry##*:}" = "$package" ] && tools="$tools ${entry%%:*}"
        done
        echo "  $package  (provides:$tools)"
      done
      echo "install them with:  sudo apt-get install -y ${missing[*]}"
      echo "or run this script as root to install them automatically."
    } >&2
    exit 2
  fi
fi

# fio must have been built with libnbd: the tests use --ioengine=nbd.
if ! fio --enghelp 2>/dev/null | grep -qx '[[:space:]]*nbd'; then
  fail "this fio ($(fio --version 2>/dev/null)) has no 'nbd' ioengine; install Debian's fio (built with libnbd) or build fio with libnbd support"
fi

# qemu's iSCSI block driver is a module of the same build as qemu-utils: install the package
# at exactly the installed qemu-utils version (from bookworm-backports when that is where
# qemu-utils came from), never a different qemu.
qemu_version="$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)"
iscsi_driver_version="$(dpkg-query -W -f='${Version}' qemu-block-extra 2>/dev/null || true)"
if [ -n "$qemu_version" ] && [ "$iscsi_driver_version" != "$qemu_version" ]; then
  if can_install; then
    say "installing qemu-block-extra $qemu_version (qemu's iSCSI driver)"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "qemu-block-extra=$qemu_version"; then
      case "$qemu_version" in
        *bpo12*)
          echo "deb http://deb.debian.org/debian bookworm-backports main" \
            > /etc/apt/sources.list.d/grove-test-backports.list
          apt-get update
          apt-get install -y --no-install-recommends "qemu-block-extra=$qemu_version" ;;
        *) fail "cannot install qemu-block-extra $qemu_version" ;;
      esac
    fi
  else
    fail "qemu's iSCSI driver is missing: install qemu-block-extra=$qemu_version"
  fi
fi

# --- 2. Rust toolchain --------------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  if can_install; then
    say "installing a Rust toolchain with rustup"
    if ! command -v curl >/dev/null 2>&1; then
      apt-get install -y --no-install-recommends curl ca-certificates
    fi
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
      | sh -s -- -y --profile minimal --component clippy,rustfmt
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    fail "no Rust toolchain: install one with https://rustup.rs (with the clippy and rustfmt components), or run this script as root"
  fi
fi
for component in clippy rustfmt; do
  subcommand="$component"
  [ "$component" = rustfmt ] && subcommand=fmt
  if ! cargo "$subcommand" --version >/dev/null 2>&1; then
    if command -v rustup >/dev/null 2>&1; then
      say "adding the Rust component $component"
      rustup component add "$component"
    else
      fail "cargo $subcommand is not available: install the Rust component $component"
    fi
  fi
done

say "tool versions"
{
  cargo --version
  rustc --version
  qemu-io --version | sed -n 1p
  nbdinfo --version | sed -n 1p
  fio --version
  nbdkit --version
} | sed 's/^/    /'

# --- 3. The suite ---------------------------------------------------------------------------
export RUST_BACKTRACE=1
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

names=()
results=()
durations=()
overall=0

step() {
  local name="$1"
  shift
  say "$name: $*"
  local started=$SECONDS status=0
  "$@" || status=$?
  local elapsed=$((SECONDS - started))
  names+=("$name")
  durations+=("${elapsed}s")
  if [ "$status" -eq 0 ]; then
    results+=("PASS")
  else
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
      results+=("FAIL (timed out)")
    else
      results+=("FAIL (exit $status)")
    fi
    overall=1
  fi
}

# A hung test must fail the run, not stall it: each test step has a time limit (timeout
# signals the whole process group, so test binaries and the servers they started go too).
TEST_STEP_TIMEOUT_SECONDS="${GROVE_TEST_STEP_TIMEOUT_SECONDS:-600}"

suite_started=$SECONDS
step "format" cargo fmt --all -- --check
step "clippy" cargo clippy --workspace --all-targets --locked -- -D warnings
step "build" cargo build --workspace --all-targets --locked
# shellcheck disable=SC2086 # CARGO_TEST_ARGS is split on purpose.
step "tests: library crates" \
  timeout --kill-after=30 "$TEST_STEP_TIMEOUT_SECONDS" \
  cargo test --workspace --exclude grove --locked --no-fail-fast ${CARGO_TEST_ARGS:-}
# shellcheck disable=SC2086
step "tests: grove + end-to-end" \
  timeout --kill-after=30 "$TEST_STEP_TIMEOUT_SECONDS" \
  cargo test -p grove --locked --no-fail-fast ${CARGO_TEST_ARGS:-}
# Power loss at engine level, more seeds than the debug run above: the crash simulation
# (writes, trims, commits, branches, flushes, torn and dropped unflushed writes) and the history
# model (merges, squashes, clones, deletes, resets with power cuts), in release mode. Millions
# of seeds: see engine/tests/crash_model.rs and history_model.rs.
if [ -z "${CARGO_TEST_ARGS:-}" ]; then
  step "power loss, 2500 seeds" \
    timeout --kill-after=30 "$TEST_STEP_TIMEOUT_SECONDS" \
    env GROVE_CRASH_SEEDS=2000 GROVE_HISTORY_SEEDS=500 \
    cargo test --release --locked -p grove-engine --test crash_model --test history_model
fi
# The benchmark's smoke mode (bench/): every workload once, small and short, so that the
# benchmark keeps working. Its figures are printed, never checked: this step fails only when
# the benchmark itself does. The release build comes first, outside the time limit.
# shellcheck disable=SC2317 # called through step
bench_quick() {
  local release="${CARGO_TARGET_DIR:-target}/release"
  cargo build --release --locked -p grove -p grove-bench --bins &&
    timeout --kill-after=30 "$TEST_STEP_TIMEOUT_SECONDS" \
      "$release/grove-bench" --quick --grove "$release/grove" \
      --json "$release/bench-quick.json"
}
if [ -z "${CARGO_TEST_ARGS:-}" ]; then
  step "benchmark, --quick" bench_quick
fi
# Coverage-guided fuzzing, short: every target of fuzz/ for 15 s (scripts/fuzz.sh runs longer
# campaigns). Skipped when only some tests were asked for, or with GROVE_TEST_NO_FUZZ=1.
if [ -z "${CARGO_TEST_ARGS:-}" ] && [ "${GROVE_TEST_NO_FUZZ:-0}" != 1 ]; then
  step "fuzz, 15 s per target" timeout --kill-after=30 1500 scripts/fuzz.sh --quick
fi

echo
echo "==================== grove test summary ===================="
for index in "${!names[@]}"; do
  printf '  %-28s %-16s %s\n' "${names[$index]}" "${results[$index]}" "${durations[$index]}"
done
printf '  %-28s %-16s %s\n' "total" "$([ "$overall" -eq 0 ] && echo PASS || echo FAIL)" "$((SECONDS - suite_started))s"
echo "============================================================"
exit "$overall"
