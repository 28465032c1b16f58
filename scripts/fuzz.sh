#!/usr/bin/env bash
# Builds and runs grove's coverage-guided fuzz targets (fuzz/, cargo-fuzz + libFuzzer with
# AddressSanitizer and debug assertions), one after the other.
#
#   scripts/fuzz.sh [--quick | --seconds N] [TARGET...]
#
#   --quick       a short run for CI: 15 s per target (all seven: about 2.5 minutes once built).
#   --seconds N   N seconds per target (default 60).
#   TARGET...     some of: nbd_handshake iscsi_pdu iscsi_login iscsi_connection engine_decoders pool_open
#                 api_bodies (default: all).
#
# Every run uses -rss_limit_mb=2048 and -timeout=10, so unbounded allocation (an OOM) and
# hangs (one input over 10 s) are failures like panics, sanitizer reports and leaks. The script
# exits non-zero if any target failed, printing the reproducer and the command that replays it.
#
# Seeds live in fuzz/corpus/TARGET/seed-* (committed); libFuzzer adds what it finds to the same
# directory (ignored by git), so later runs start from there. Dictionaries are fuzz/dict/TARGET.dict.
#
# Long campaigns, e.g. an hour on the PDU parser, or several jobs in parallel:
#   scripts/fuzz.sh --seconds 3600 iscsi_pdu
#   FUZZ_ARGS="-jobs=4 -workers=4" scripts/fuzz.sh --seconds 3600 pool_open
# FUZZ_ARGS is passed to libFuzzer as is. To replay one input by hand:
#   RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz TARGET fuzz/artifacts/TARGET/crash-...
# (or run the built binary fuzz/target/x86_64-unknown-linux-gnu/release/TARGET on the file).
#
# cargo-fuzz needs nightly `-Z` flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain take them.
# The fuzz crate has its own workspace, lock file and target directory (fuzz/target).

set -euo pipefail

cd "$(dirname "$0")/.."
root=$PWD
seconds=60
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) seconds=15 ;;
        --seconds) seconds="$2"; shift ;;
        -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
        -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
        *) targets+=("$1") ;;
    esac
    shift
done
all=(nbd_handshake iscsi_pdu iscsi_login iscsi_connection engine_decoders pool_open api_bodies)
if [ ${#targets[@]} -eq 0 ]; then
    targets=("${all[@]}")
fi

export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="$root/fuzz/target"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

echo "fuzz.sh: building ${targets[*]}" >&2
for target in "${targets[@]}"; do
    cargo fuzz build --fuzz-dir fuzz "$target"
done
bin_dir="$CARGO_TARGET_DIR/$(rustc -vV | sed -n 's/^host: //p')/release"

failed=()
for target in "${targets[@]}"; do
    corpus="$root/fuzz/corpus/$target"
    artifacts="$root/fuzz/artifacts/$target"
    mkdir -p "$corpus" "$artifacts"
    dict=()
    if [ -f "$root/fuzz/dict/$target.dict" ]; then
        dict=("-dict=$root/fuzz/dict/$target.dict")
    fi
    log="$artifacts/last-run.log"
    echo "fuzz.sh: $target for ${seconds}s" >&2
    # shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags.
    if "$bin_dir/$target" "$corpus" "${dict[@]}" \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" ${FUZZ_ARGS:-} >"$log" 2>&1; then
        tail -n 12 "$log" | grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|Done)' >&2 || true
    else
        failed+=("$target")
        echo "fuzz.sh: $target FAILED; the end of its log ($log):" >&2
        grep -v '^    #[0-9]' "$log" | tail -n 40 >&2
        for input in $(sed -n "s/.*Test unit written to \(.*\)$/\1/p" "$log"); do
            echo "fuzz.sh: reproducer: $input" >&2
            echo "fuzz.sh: replay with: RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz $target $input" >&2
        done
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz.sh: failed: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz.sh: no failures in ${targets[*]}" >&2
