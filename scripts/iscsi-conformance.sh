#!/usr/bin/env bash
# iSCSI conformance harness: runs libiscsi's conformance suite (`iscsi-test-cu`, Debian package
# libiscsi-bin) against grove's iSCSI target and compares it with tgt, the Linux reference
# target (Debian package tgt), either run side by side (--tgt) or from the stored baselines
# tests/iscsi/tgt-baseline.txt (a 1 GiB file LUN, as tgt exports it by default: fully
# provisioned) and tests/iscsi/tgt-thin-baseline.txt (the same LUN with tgt's
# thin_provisioning=1, which makes the UNMAP / WRITE SAME unmap / GET LBA STATUS tests run).
# The reference is their union: a test counts as passed by tgt if either configuration passes it.
#
# Every test group (e.g. SCSI.Read10) runs in its own iscsi-test-cu process under a time limit:
# some tests leave state behind (a CompareAndWrite test breaks later 16-byte commands in the
# same process) and a hung target must not hang the run. Write tests need --dataloss, which is
# always passed: the LUN under test is overwritten.
#
# By default the script starts its own grove (free 127.0.0.1 ports, a temporary data dir, a
# 1 GiB volume `conf`) and tests iscsi://127.0.0.1:PORT/iqn.2026-11.io.grove:conf/0.
# All servers it starts listen on 127.0.0.1 only and are stopped (by PID) when it exits.
#
# Output: a per-group table (PASS/FAIL/SKIP per target), totals, the "regressions" (tests the
# reference passes that grove fails), per-test result files, every iscsi-test-cu log, and
# results.json, all in the output directory.
#
# Exit status: 0 no regressions; 1 grove fails a test tgt passes (with --strict also: a test
# tgt passes is skipped by grove, or grove fails any test); 2 usage or missing tools;
# 3 a target could not be started or reached.
#
# Usage: scripts/iscsi-conformance.sh [OPTIONS]
#   --url URL            test this iSCSI URL instead of starting grove
#                        (iscsi://127.0.0.1:PORT/IQN/LUN; the LUN is overwritten)
#   --grove-bin PATH     grove binary to start (default: the newer of target/release/grove and
#                        target/debug/grove; env GROVE_BIN)
#   --build              run `cargo build -p grove` first and use target/debug/grove
#   --tgt                also start tgtd (127.0.0.1, a free port) with two 1 GiB file LUNs,
#                        LUN 1 as is ("tgt") and LUN 2 with thin_provisioning=1 ("tgt-thin"),
#                        and run the same tests against both; they become the reference
#   --no-grove           run only tgt (implies --tgt); with --update-baseline this regenerates
#                        the baselines
#   --update-baseline    write the tgt results to the baseline files (needs --tgt, full run)
#   --baseline FILE      reference results when tgt is not run (repeatable; default
#                        tests/iscsi/tgt-baseline.txt and tests/iscsi/tgt-thin-baseline.txt)
#   --quick              a quick subset of groups (basic reads, writes, inquiry, capacity,
#                        mode sense, iSCSI CmdSN and residuals)
#   --groups LIST        comma-separated groups or glob patterns (SCSI.Read*,iSCSI.iSCSIcmdsn)
#   --exclude LIST       comma-separated groups or glob patterns to leave out
#   --per-test           one process per test instead of per group (slower; note that
#                        iSCSI.iSCSITMF.LUNResetSimpleAsync fails alone even on tgt)
#   --timeout SECS       time limit per iscsi-test-cu process [120]
#   --max-timeouts N     after N groups in a row time out, give up on the target and mark
#                        the remaining groups failed ("not run") [3]
#   --out DIR            output directory [a new /tmp/iscsi-conformance.XXXXXX]
#   --json FILE          also copy results.json to FILE
#   --size SIZE          size of the grove volume / tgt LUN [1GiB]
#   --strict             also fail on grove SKIPs of tests tgt passes and on any grove failure
#   --cu-arg ARG         extra argument for iscsi-test-cu (repeatable), e.g. --cu-arg=-V
#   --keep               keep the work dir (grove's data dir, the tgt backing files)
#   -h, --help           this text
set -uo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"

URL=""
GROVE_BIN="${GROVE_BIN:-}"
BUILD=0
RUN_TGT=0
RUN_GROVE=1
UPDATE_BASELINE=0
BASELINE_THICK="$ROOT/tests/iscsi/tgt-baseline.txt"
BASELINE_THIN="$ROOT/tests/iscsi/tgt-thin-baseline.txt"
BASELINES=()
QUICK=0
GROUPS_SEL=""
EXCLUDE_SEL=""
PER_TEST=0
TIMEOUT=120
MAX_TIMEOUTS=3
OUT=""
JSON_COPY=""
SIZE="1GiB"
STRICT=0
KEEP=0
CU_ARGS=()

QUICK_GROUPS="SCSI.TestUnitReady,SCSI.Inquiry,SCSI.ReadCapacity10,SCSI.ReadCapacity16,SCSI.ModeSense6,SCSI.ReportSupportedOpcodes,SCSI.Read10,SCSI.Read16,SCSI.Write10,SCSI.Write16,SCSI.Verify10,SCSI.Mandatory,iSCSI.iSCSIcmdsn,iSCSI.iSCSIResiduals"

say() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { local code="$1"; shift; printf 'error: %s\n' "$*" >&2; exit "$code"; }
usage() { sed -n '2,/^set -uo pipefail/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

# needval "$@": the option's value, from --opt=VALUE or the next argument.
needval() {
  if [ "$has_val" = 1 ]; then return 0; fi
  [ $# -ge 2 ] || die 2 "$arg needs a value"
  val="$2"; shift_extra=1
}
while [ $# -gt 0 ]; do
  arg="$1"; val=""; has_val=0; shift_extra=0
  case "$arg" in
    --*=*) val="${arg#*=}"; arg="${arg%%=*}"; has_val=1 ;;
  esac
  case "$arg" in
    --url) needval "$@"; URL="$val" ;;
    --grove-bin) needval "$@"; GROVE_BIN="$val" ;;
    --build) BUILD=1 ;;
    --tgt) RUN_TGT=1 ;;
    --no-grove) RUN_GROVE=0; RUN_TGT=1 ;;
    --update-baseline) UPDATE_BASELINE=1 ;;
    --baseline) needval "$@"; [ "$val" != "${val#/}" ] || val="$PWD/$val"; BASELINES+=("$val") ;;
    --quick) QUICK=1 ;;
    --groups) needval "$@"; GROUPS_SEL="$val" ;;
    --exclude) needval "$@"; EXCLUDE_SEL="$val" ;;
    --per-test) PER_TEST=1 ;;
    --timeout) needval "$@"; TIMEOUT="$val" ;;
    --out) needval "$@"; OUT="$val" ;;
    --max-timeouts) needval "$@"; MAX_TIMEOUTS="$val" ;;
    --json) needval "$@"; JSON_COPY="$val" ;;
    --size) needval "$@"; SIZE="$val" ;;
    --strict) STRICT=1 ;;
    --cu-arg) needval "$@"; CU_ARGS+=("$val") ;;
    --keep) KEEP=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die 2 "unknown option: $1 (see --help)" ;;
  esac
  shift; [ "$shift_extra" = 1 ] && shift
done

case "$TIMEOUT" in ''|*[!0-9]*) die 2 "--timeout needs a number of seconds" ;; esac
case "$MAX_TIMEOUTS" in ''|*[!0-9]*|0) die 2 "--max-timeouts needs a positive number" ;; esac
[ "$UPDATE_BASELINE" = 1 ] && [ "$RUN_TGT" = 0 ] && die 2 "--update-baseline needs --tgt"
if [ "$UPDATE_BASELINE" = 1 ] && { [ "$QUICK" = 1 ] || [ -n "$GROUPS_SEL$EXCLUDE_SEL" ] || [ "$PER_TEST" = 1 ]; }; then
  die 2 "--update-baseline needs a full per-group run (no --quick/--groups/--exclude/--per-test)"
fi
[ -n "$URL" ] && case "$URL" in iscsi://*) ;; *) die 2 "--url must be an iscsi:// URL" ;; esac
[ ${#BASELINES[@]} -gt 0 ] || BASELINES=("$BASELINE_THICK" "$BASELINE_THIN")
[ -z "$JSON_COPY" ] || [ "$JSON_COPY" != "${JSON_COPY#/}" ] || JSON_COPY="$PWD/$JSON_COPY"

# --- tools ----------------------------------------------------------------------------------
ensure_tools() {
  local need=() pkgs=()
  command -v iscsi-test-cu >/dev/null 2>&1 || { need+=(iscsi-test-cu); pkgs+=(libiscsi-bin); }
  if [ "$RUN_TGT" = 1 ]; then
    { command -v tgtd >/dev/null 2>&1 && command -v tgtadm >/dev/null 2>&1; } || { need+=(tgtd); pkgs+=(tgt); }
  fi
  for t in timeout stdbuf awk mktemp; do
    command -v "$t" >/dev/null 2>&1 || die 2 "$t (coreutils/awk) not found"
  done
  [ ${#pkgs[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing ${pkgs[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}" >&2 ||
      { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}" >&2; } ||
      die 2 "could not install ${pkgs[*]}"
    # The tgt package may enable and start a tgt service on 0.0.0.0:3260; this script never
    # uses it (its own tgtd has a private control port and a 127.0.0.1 portal).
  else
    die 2 "missing ${need[*]}: run  apt-get install -y ${pkgs[*]}"
  fi
}
ensure_tools
[ "$RUN_TGT" = 1 ] && [ "$(id -u)" -ne 0 ] && die 2 "--tgt needs root (tgtd)"

# --- work and output directories --------------------------------------------------------------
if [ -z "$OUT" ]; then
  OUT="$(mktemp -d /tmp/iscsi-conformance.XXXXXX)" || die 2 "mktemp failed"
else
  mkdir -p "$OUT" || die 2 "cannot create $OUT"
  OUT="$(cd "$OUT" && pwd)"
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/iscsi-conformance-work.XXXXXX")" || die 2 "mktemp failed"

GROVE_PID=""
TGTD_PID=""
TGT_CTL=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  stop_pid() { # pid name
    local pid="$1" i
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    if [ "$2" = tgtd ]; then
      # tgtd ignores SIGTERM while it has targets; this is how it is told to exit.
      tgtadm -C "$TGT_CTL" --lld iscsi --op delete --mode target --tid 1 --force > /dev/null 2>&1
      tgtadm -C "$TGT_CTL" --op delete --mode system > /dev/null 2>&1
    else
      kill -TERM "$pid" 2>/dev/null
    fi
    for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      warn "$2 (pid $pid) did not stop within 10s; killing it"
      kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
  }
  if [ -n "${CU_PID:-}" ]; then kill -TERM "$CU_PID" 2>/dev/null; wait "$CU_PID" 2>/dev/null; fi
  stop_pid "$GROVE_PID" grove
  stop_pid "$TGTD_PID" tgtd
  if [ -n "$TGT_CTL" ]; then rm -f "/var/run/tgtd/socket.$TGT_CTL" "/var/run/tgtd/socket.$TGT_CTL.lock"; fi
  if [ "$KEEP" = 1 ]; then
    say "kept work files in $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# --- ports ----------------------------------------------------------------------------------
USED_PORTS=" "
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() { # [preferred]
  local p i
  if [ -n "${1:-}" ] && ! port_in_use "$1" && [ "${USED_PORTS#* "$1" }" = "$USED_PORTS" ]; then
    USED_PORTS+="$1 "; echo "$1"; return 0
  fi
  for i in $(seq 1 200); do
    p=$((20000 + RANDOM % 40000))
    [ "${USED_PORTS#* "$p" }" = "$USED_PORTS" ] || continue
    port_in_use "$p" && continue
    USED_PORTS+="$p "; echo "$p"; return 0
  done
  die 3 "no free port found"
}
wait_port() { # port seconds pid
  local i
  for i in $(seq 1 $(($2 * 10))); do
    port_in_use "$1" && return 0
    [ -n "${3:-}" ] && ! kill -0 "$3" 2>/dev/null && return 1
    sleep 0.1
  done
  return 1
}

# --- the test list --------------------------------------------------------------------------
# Families SCSI (215 tests) and iSCSI (15 tests); ALL repeats them and LINUX is for SG_IO devices.
ALL_TESTS="$WORK/all-tests"
iscsi-test-cu --list 2>/dev/null | awk -F. '($1 == "SCSI" || $1 == "iSCSI") && NF == 3' > "$ALL_TESTS"
[ -s "$ALL_TESTS" ] || die 2 "iscsi-test-cu --list printed no SCSI/iSCSI tests"

match_any() { # name comma-list-of-globs
  local pat name="$1"
  local IFS=,
  for pat in $2; do
    [ -z "$pat" ] && continue
    # shellcheck disable=SC2053
    [[ "$name" == $pat ]] && return 0
  done
  return 1
}
SEL_GROUPS=()
while read -r g; do
  if [ "$QUICK" = 1 ] && ! match_any "$g" "$QUICK_GROUPS"; then continue; fi
  if [ -n "$GROUPS_SEL" ] && ! match_any "$g" "$GROUPS_SEL"; then continue; fi
  if [ -n "$EXCLUDE_SEL" ] && match_any "$g" "$EXCLUDE_SEL"; then continue; fi
  SEL_GROUPS+=("$g")
done < <(awk -F. '{ g = $1 "." $2; if (!(g in seen)) { seen[g] = 1; print g } }' "$ALL_TESTS")
[ ${#SEL_GROUPS[@]} -gt 0 ] || die 2 "no test group selected"
SEL_TESTS="$OUT/selected-tests.txt"
for g in "${SEL_GROUPS[@]}"; do grep -F "$g." "$ALL_TESTS" | awk -F. -v g="$g" '$1 "." $2 == g'; done > "$SEL_TESTS"

# Turns one iscsi-test-cu verbose log into "PASS|FAIL|SKIP FAMILY.SUITE.TEST" lines. CUnit
# prints "  Test: NAME ..." then the test's own log lines (indented) and then "passed" or
# "FAILED" (unindented, or right after the "..."). libiscsi skips a test with CU_PASS after
# logging "[SKIPPED] reason", so a passed test whose log has [SKIPPED] is a SKIP.
PARSE_AWK='
function finish() {
  if (cur == "") return
  if (term == "FAILED") st = "FAIL"
  else if (term == "passed") st = (skip ? "SKIP" : "PASS")
  else st = "NORESULT"
  print st, prefix "." cur
  cur = ""
}
function content(s) {
  if (term != "") return
  if (s ~ /^(passed|FAILED)/) { term = substr(s, 1, 6); return }
  if (index(s, "[SKIPPED]")) skip = 1
}
/^  Test: .* \.\.\./ {
  finish()
  s = $0; sub(/^  Test: /, "", s)
  i = index(s, " ...")
  cur = substr(s, 1, i - 1); rest = substr(s, i + 4)
  term = ""; skip = 0
  content(rest)
  next
}
/^Run Summary:/ { finish(); done = 1 }
{ if (!done && cur != "") content($0) }
END { finish() }
'

# run_cu LABEL URL SELECTOR LOG -> exit status of iscsi-test-cu (124 on timeout)
# (in the background and waited for, so that a signal to this script is handled at once)
CU_PID=""
run_cu() {
  local rc
  ( cd "$WORK" && exec timeout -k 10 "$TIMEOUT" stdbuf -oL -eL \
      iscsi-test-cu --dataloss ${CU_ARGS[@]+"${CU_ARGS[@]}"} -t "$3" "$2" ) > "$4" 2>&1 < /dev/null &
  CU_PID=$!
  wait "$CU_PID"; rc=$?
  CU_PID=""
  return $rc
}

# run_suite LABEL URL: writes $OUT/LABEL/results.txt ("STATUS NAME [# note]")
run_suite() {
  local label="$1" url="$2" dir="$OUT/$1" g t rc log start elapsed n_fail n_skip n_pass
  mkdir -p "$dir/logs"
  : > "$dir/results.txt"
  : > "$dir/groups.txt"
  local abort="" timeouts=0 server_pid=""
  case $label in grove) server_pid="$GROVE_PID" ;; tgt*) server_pid="$TGTD_PID" ;; esac
  say "$label: running ${#SEL_GROUPS[@]} groups against $url (logs in $dir/logs)"
  for g in "${SEL_GROUPS[@]}"; do
    if [ -z "$abort" ] && [ -n "$server_pid" ] && ! kill -0 "$server_pid" 2>/dev/null; then
      abort="the $label server exited (see its log in $OUT)"
    fi
    if [ -n "$abort" ]; then
      awk -F. -v g="$g" -v why="$abort" '$1 "." $2 == g { print "FAIL", $0, "# not run: " why }' "$SEL_TESTS" >> "$dir/results.txt"
      printf '%s %d %d %d %d %d\n' "$g" 0 "$(awk -F. -v g="$g" '$1 "." $2 == g' "$SEL_TESTS" | wc -l)" 0 -1 0 >> "$dir/groups.txt"
      printf '    %-36s not run: %s\n' "$g" "$abort" >&2
      continue
    fi
    start=$(date +%s)
    if [ "$PER_TEST" = 1 ]; then
      rc=0
      : > "$dir/logs/$g.parsed"
      while read -r t; do
        log="$dir/logs/$t.log"
        run_cu "$label" "$url" "$t" "$log"; local trc=$?
        [ $trc -eq 0 ] || [ $trc -eq 1 ] || rc=$trc
        awk -v prefix="$g" "$PARSE_AWK" "$log" | awk -v t="$t" -v rc=$trc '
          { print; n++ } END { if (!n) print "NORESULT", t }' >> "$dir/logs/$g.parsed"
      done < <(awk -F. -v g="$g" '$1 "." $2 == g' "$SEL_TESTS")
    else
      log="$dir/logs/$g.log"
      run_cu "$label" "$url" "$g" "$log"; rc=$?
      awk -v prefix="$g" "$PARSE_AWK" "$log" > "$dir/logs/$g.parsed"
    fi
    elapsed=$(( $(date +%s) - start ))
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then timeouts=$((timeouts + 1)); else timeouts=0; fi
    if [ "$timeouts" -ge "$MAX_TIMEOUTS" ]; then
      abort="$timeouts groups in a row timed out (--max-timeouts $MAX_TIMEOUTS)"
    fi
    # Every test of the group gets exactly one result; tests with no result (the process
    # timed out, crashed, or could not log in) are failures.
    local note="no result"
    case $rc in
      124|137) note="no result: timed out after ${TIMEOUT}s" ;;
      255) note="no result: iscsi-test-cu could not set up (login, READ CAPACITY, INQUIRY...)" ;;
      0|1) ;;
      *) note="no result: iscsi-test-cu exit status $rc" ;;
    esac
    awk -F. -v g="$g" '$1 "." $2 == g' "$SEL_TESTS" | awk -v note="$note" '
      FILENAME == ARGV[1] { if ($1 != "NORESULT" && !($2 in r)) r[$2] = $1; next }
      { if ($0 in r) print r[$0], $0; else print "FAIL", $0, "# " note }
    ' "$dir/logs/$g.parsed" - >> "$dir/results.txt"
    read -r n_pass n_fail n_skip < <(awk -v g="$g" '
      { split($2, a, "."); if (a[1] "." a[2] != g) next; c[$1]++ }
      END { printf "%d %d %d\n", c["PASS"], c["FAIL"], c["SKIP"] }' "$dir/results.txt")
    printf '%s %d %d %d %d %d\n' "$g" "$n_pass" "$n_fail" "$n_skip" "$rc" "$elapsed" >> "$dir/groups.txt"
    printf '    %-36s pass %3d  fail %3d  skip %3d  (%ss%s)\n' "$g" "$n_pass" "$n_fail" "$n_skip" \
      "$elapsed" "$( [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo ', TIMED OUT')" >&2
  done
}

# --- tgt ------------------------------------------------------------------------------------
TGT_URL=""
TGT_THIN_URL=""
TGT_IQN="iqn.2026-11.io.grove.conformance:tgt"
size_bytes() {
  local s="$1" n unit
  n="${s%%[!0-9]*}"; unit="${s#"$n"}"
  [ -n "$n" ] || die 2 "bad size: $s"
  case "$unit" in
    ''|B) echo "$n" ;;
    K|KiB) echo $((n << 10)) ;;
    M|MiB) echo $((n << 20)) ;;
    G|GiB) echo $((n << 30)) ;;
    T|TiB) echo $((n << 40)) ;;
    *) die 2 "bad size unit in $s (use KiB, MiB, GiB, TiB)" ;;
  esac
}
start_tgt() {
  local port i
  port="$(free_port 3261)"
  # A private control port (tgtadm -C) so a tgtd started by systemd is never touched.
  for i in $(seq 1 100); do
    TGT_CTL=$((1000 + RANDOM % 8000))
    [ -e "/var/run/tgtd/socket.$TGT_CTL" ] || break
  done
  truncate -s "$(size_bytes "$SIZE")" "$WORK/tgt-lun1.img" "$WORK/tgt-lun2.img" ||
    die 3 "cannot create the tgt backing files"
  say "tgt: starting tgtd on 127.0.0.1:$port (control port $TGT_CTL)"
  tgtd -f -C "$TGT_CTL" --iscsi "portal=127.0.0.1:$port" > "$OUT/tgtd.log" 2>&1 &
  TGTD_PID=$!
  for i in $(seq 1 100); do
    tgtadm -C "$TGT_CTL" --lld iscsi --op show --mode sys > /dev/null 2>&1 && break
    kill -0 "$TGTD_PID" 2>/dev/null || die 3 "tgtd exited; see $OUT/tgtd.log"
    sleep 0.1
  done
  tgtadm -C "$TGT_CTL" --lld iscsi --op new --mode target --tid 1 -T "$TGT_IQN" &&
  # LUN 0 of a tgt target is its controller; the disk is LUN 1.
  tgtadm -C "$TGT_CTL" --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$WORK/tgt-lun1.img" &&
  tgtadm -C "$TGT_CTL" --lld iscsi --op new --mode logicalunit --tid 1 --lun 2 -b "$WORK/tgt-lun2.img" &&
  tgtadm -C "$TGT_CTL" --lld iscsi --op update --mode logicalunit --tid 1 --lun 2 --params thin_provisioning=1 &&
  tgtadm -C "$TGT_CTL" --lld iscsi --op bind --mode target --tid 1 -I ALL ||
    die 3 "tgtadm could not configure the target"
  tgtadm -C "$TGT_CTL" --lld iscsi --op show --mode target > "$OUT/tgt-target.txt" 2>&1
  wait_port "$port" 10 "$TGTD_PID" || die 3 "tgtd is not listening on 127.0.0.1:$port"
  TGT_URL="iscsi://127.0.0.1:$port/$TGT_IQN/1"
  TGT_THIN_URL="iscsi://127.0.0.1:$port/$TGT_IQN/2"
}

# --- grove ----------------------------------------------------------------------------------
GROVE_URL=""
start_grove() {
  local nbd api iscsi i api_url
  if [ "$BUILD" = 1 ]; then
    say "building grove (cargo build -p grove)"
    (cd "$ROOT" && cargo build -p grove) >&2 || die 3 "cargo build failed"
    GROVE_BIN="$ROOT/target/debug/grove"
  fi
  if [ -z "$GROVE_BIN" ]; then
    for b in "$ROOT/target/release/grove" "$ROOT/target/debug/grove"; do
      [ -x "$b" ] || continue
      if [ -z "$GROVE_BIN" ] || [ "$b" -nt "$GROVE_BIN" ]; then GROVE_BIN="$b"; fi
    done
  fi
  [ -n "$GROVE_BIN" ] && [ -x "$GROVE_BIN" ] ||
    die 3 "no grove binary (build one with cargo build, or pass --grove-bin / --build)"
  # Run a private copy: cargo may relink target/*/grove while the tests run.
  cp "$GROVE_BIN" "$WORK/grove" || die 3 "cannot copy $GROVE_BIN"
  "$WORK/grove" --version > "$OUT/grove-version.txt" 2>&1
  nbd="$(free_port)"; api="$(free_port)"; iscsi="$(free_port)"
  api_url="http://127.0.0.1:$api"
  say "grove: starting $GROVE_BIN ($(cat "$OUT/grove-version.txt"); iSCSI 127.0.0.1:$iscsi, API $api_url, NBD 127.0.0.1:$nbd)"
  "$WORK/grove" serve --data-dir "$WORK/grove-data" --nbd-listen "127.0.0.1:$nbd" \
    --api-listen "127.0.0.1:$api" --iscsi-listen "127.0.0.1:$iscsi" > "$OUT/grove.log" 2>&1 &
  GROVE_PID=$!
  wait_port "$api" 60 "$GROVE_PID" || die 3 "grove's API did not come up; see $OUT/grove.log"
  "$WORK/grove" --api "$api_url" volume create conf --size "$SIZE" >> "$OUT/grove.log" 2>&1 ||
    die 3 "grove volume create failed; see $OUT/grove.log"
  if ! wait_port "$iscsi" 20 "$GROVE_PID"; then
    if grep -q 'iSCSI is not available yet' "$OUT/grove.log"; then
      die 3 "this grove ($GROVE_BIN) has no iSCSI target yet (\"iSCSI is not available yet\" in its log)"
    fi
    die 3 "grove is not listening on iSCSI 127.0.0.1:$iscsi; see $OUT/grove.log"
  fi
  GROVE_URL="iscsi://127.0.0.1:$iscsi/iqn.2026-11.io.grove:conf/0"
}

# --- run ------------------------------------------------------------------------------------
say "output: $OUT"
LABELS=()
if [ "$RUN_TGT" = 1 ]; then
  start_tgt
  run_suite tgt "$TGT_URL"
  run_suite tgt-thin "$TGT_THIN_URL"
  LABELS+=(tgt tgt-thin)
fi
if [ "$RUN_GROVE" = 1 ]; then
  if [ -n "$URL" ]; then
    GROVE_URL="$URL"
  else
    start_grove
  fi
  run_suite grove "$GROVE_URL"
  if [ -n "$GROVE_PID" ] && ! kill -0 "$GROVE_PID" 2>/dev/null; then
    warn "grove exited during the run; see $OUT/grove.log"
  fi
  LABELS+=(grove)
fi

LIBISCSI_VERSION="$(dpkg-query -W -f '${Version}' libiscsi-bin 2>/dev/null || echo unknown)"
TGT_VERSION="$(dpkg-query -W -f '${Version}' tgt 2>/dev/null || echo unknown)"

# --- reference ------------------------------------------------------------------------------
# REF_FILE: "STATUS NAME" per selected test, PASS if any reference passes it, else FAIL if any
# fails it, else SKIP.
REF_NAMES=()   # column labels
REF_SOURCES=() # their result files
if [ "$RUN_TGT" = 1 ]; then
  REF_NAMES=(tgt tgt-thin)
  REF_SOURCES=("$OUT/tgt/results.txt" "$OUT/tgt-thin/results.txt")
  REF_DESC="tgt run now (LUN 1 as is, LUN 2 thin-provisioned)"
else
  REF_DESC=""
  for b in "${BASELINES[@]}"; do
    if [ -f "$b" ]; then
      n="$(basename "$b" .txt)"
      awk '!/^#/ && NF >= 2 { print $1, $2 }' "$b" > "$WORK/ref-$n.txt"
      REF_NAMES+=("$n"); REF_SOURCES+=("$WORK/ref-$n.txt")
      REF_DESC+="${REF_DESC:+, }${b#"$ROOT/"}"
    else
      warn "baseline $b not found; not used"
    fi
  done
  [ ${#REF_NAMES[@]} -gt 0 ] || warn "no baseline and --tgt not given: nothing to compare with"
fi
REF_FILE="$WORK/reference.txt"
cat ${REF_SOURCES[@]+"${REF_SOURCES[@]}"} < /dev/null | awk '
  FILENAME == ARGV[1] { sel[$1] = 1; order[++n] = $1; next }
  ($2 in sel) {
    if ($1 == "PASS") st[$2] = "PASS"
    else if ($1 == "FAIL" && st[$2] != "PASS") st[$2] = "FAIL"
    else if (!($2 in st)) st[$2] = $1
  }
  END { for (i = 1; i <= n; i++) if (order[i] in st) print st[order[i]], order[i] }
' "$SEL_TESTS" - > "$REF_FILE"

if [ "$UPDATE_BASELINE" = 1 ]; then
  write_baseline() { # label file description
    mkdir -p "$(dirname "$2")"
    {
      echo "# $1 baseline for scripts/iscsi-conformance.sh: libiscsi's iscsi-test-cu against tgt."
      echo "# Generated $(date -u +%Y-%m-%dT%H:%M:%SZ) by: scripts/iscsi-conformance.sh --no-grove --update-baseline"
      echo "# tgt $TGT_VERSION (Debian package tgt), libiscsi-bin $LIBISCSI_VERSION."
      echo "# Target: tgtd -f -C CTL --iscsi portal=127.0.0.1:PORT; one target $TGT_IQN,"
      echo "# bound to all initiators (tgtadm --op bind --mode target --tid 1 -I ALL), no CHAP."
      echo "# $3"
      echo "# (LUN 0 of a tgt target is its controller.) 512-byte blocks, ${SIZE}."
      echo "# Each group G (the SCSI.* and iSCSI.* groups of iscsi-test-cu --list) ran in its own process:"
      echo "#   timeout -k 10 $TIMEOUT stdbuf -oL -eL iscsi-test-cu --dataloss -t G $4"
      echo "# A test is SKIP when CUnit reports it passed but libiscsi logged [SKIPPED] in it."
      awk '{ split($2, a, "."); c[a[1] " " $1]++; c[$1]++ }
        END {
          printf "# Totals: PASS %d, FAIL %d, SKIP %d; SCSI: PASS %d, FAIL %d, SKIP %d; iSCSI: PASS %d, FAIL %d, SKIP %d\n",
            c["PASS"], c["FAIL"], c["SKIP"], c["SCSI PASS"], c["SCSI FAIL"], c["SCSI SKIP"],
            c["iSCSI PASS"], c["iSCSI FAIL"], c["iSCSI SKIP"] }' "$OUT/$1/results.txt"
      awk '{ print $1, $2 }' "$OUT/$1/results.txt"
    } > "$2"
    say "wrote $2"
  }
  write_baseline tgt "$BASELINE_THICK" \
    "LUN 1 = a sparse file, tgt's defaults (backing store rdwr, not thin-provisioned: LBPME=0)." \
    "iscsi://127.0.0.1:PORT/$TGT_IQN/1"
  write_baseline tgt-thin "$BASELINE_THIN" \
    "LUN 2 = a sparse file with tgtadm --op update --mode logicalunit --params thin_provisioning=1 (LBPME=1, UNMAP)." \
    "iscsi://127.0.0.1:PORT/$TGT_IQN/2"
fi

# --- compare, table, JSON -------------------------------------------------------------------
GROVE_RES="$OUT/grove/results.txt"
[ "$RUN_GROVE" = 1 ] || GROVE_RES=/dev/null
COMPARE="$OUT/compare.txt"
# kinds: REGRESSION (ref PASS, grove FAIL), GAP (ref PASS, grove SKIP),
#        OTHERFAIL (grove FAIL, ref FAIL/SKIP/absent), FIXED (ref FAIL, grove PASS)
awk 'FILENAME == ARGV[1] { ref[$2] = $1; next }
  {
    r = ($2 in ref) ? ref[$2] : "NONE"
    note = ""; i = index($0, "#"); if (i) note = substr($0, i)
    if (r == "PASS" && $1 == "FAIL") print "REGRESSION", $2, note
    else if (r == "PASS" && $1 == "SKIP") print "GAP", $2
    else if (r != "PASS" && $1 == "FAIL") print "OTHERFAIL", $2, r
    else if (r == "FAIL" && $1 == "PASS") print "FIXED", $2
  }' "$REF_FILE" "$GROVE_RES" > "$COMPARE"

N_REG=$(grep -c '^REGRESSION ' "$COMPARE")
N_GAP=$(grep -c '^GAP ' "$COMPARE")
N_OTHER=$(grep -c '^OTHERFAIL ' "$COMPARE")

# The table: one row per group, P/F/S per column (the reference first).
TABLE_COLS=()
TABLE_FILES=()
if [ "$RUN_TGT" = 0 ]; then
  for i in ${REF_NAMES[@]+"${!REF_NAMES[@]}"}; do
    # only the selected tests of a baseline
    awk 'FILENAME == ARGV[1] { sel[$1] = 1; next } ($2 in sel)' "$SEL_TESTS" "${REF_SOURCES[$i]}" > "${REF_SOURCES[$i]}.sel"
    TABLE_COLS+=("${REF_NAMES[$i]}"); TABLE_FILES+=("${REF_SOURCES[$i]}.sel")
  done
fi
for l in ${LABELS[@]+"${LABELS[@]}"}; do TABLE_COLS+=("$l"); TABLE_FILES+=("$OUT/$l/results.txt"); done
COLW=14
for c in "${TABLE_COLS[@]}"; do [ $(( ${#c} + 6 )) -le "$COLW" ] || COLW=$(( ${#c} + 6 )); done
{
  printf '\n%-34s' "GROUP"
  for c in "${TABLE_COLS[@]}"; do printf "  %-${COLW}s" "$c P/F/S"; done
  printf '\n'
  awk -v ncols="${#TABLE_COLS[@]}" -v colw="$COLW" -v groups="$(printf '%s ' "${SEL_GROUPS[@]}")" -v cmp="$COMPARE" '
    BEGIN {
      ng = split(groups, G, " ")
      while ((getline line < cmp) > 0) { split(line, f, " "); if (f[1] == "REGRESSION") { split(f[2], a, "."); reg[a[1] "." a[2]]++ } }
    }
    FNR == 1 { col++ }
    { split($2, a, "."); g = a[1] "." a[2]; fam = a[1]
      c[col, g, $1]++; c[col, fam, $1]++; c[col, "TOTAL", $1]++ }
    END {
      for (i = 1; i <= ng; i++) row(G[i], G[i])
      print ""
      row("SCSI", "total SCSI"); row("iSCSI", "total iSCSI"); row("TOTAL", "TOTAL")
    }
    function row(k, name,   j, cell) {
      printf "%-34s", name
      for (j = 1; j <= ncols; j++) {
        cell = sprintf("%d/%d/%d", c[j, k, "PASS"], c[j, k, "FAIL"], c[j, k, "SKIP"])
        printf ("  %-" colw "s"), cell
      }
      if (k in reg) printf "  << %d regression(s)", reg[k]
      printf "\n"
    }' "${TABLE_FILES[@]}"
  echo
  if [ ${#REF_NAMES[@]} -gt 0 ] && [ "$RUN_GROVE" = 1 ]; then
    echo "reference (a test passes if any of these passes it): $REF_DESC"
    echo "regressions (reference PASS, grove FAIL): $N_REG"
    grep '^REGRESSION ' "$COMPARE" | awk '{ $1 = ""; print " " $0 }'
    echo "skipped by grove, passed by the reference: $N_GAP"
    grep '^GAP ' "$COMPARE" | awk '{ print "  " $2 }'
    echo "other grove failures (reference FAIL or SKIP): $N_OTHER"
    grep '^OTHERFAIL ' "$COMPARE" | awk '{ print "  " $2 " (reference " $3 ")" }'
  fi
} | tee "$OUT/table.txt"

# JSON (written with awk; test names and URLs need no escaping beyond quotes and backslashes).
json_str() { printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g')"; }
{
  printf '{\n'
  printf '  "tool": "iscsi-test-cu",\n'
  printf '  "libiscsi_version": %s,\n' "$(json_str "$LIBISCSI_VERSION")"
  printf '  "tgt_version": %s,\n' "$(json_str "$TGT_VERSION")"
  printf '  "mode": %s,\n' "$(json_str "$( [ "$PER_TEST" = 1 ] && echo per-test || echo per-group)")"
  printf '  "timeout_seconds": %d,\n' "$TIMEOUT"
  printf '  "groups": ['; first=1
  for g in "${SEL_GROUPS[@]}"; do [ $first = 1 ] || printf ', '; first=0; json_str "$g"; done
  printf '],\n'
  printf '  "reference": %s,\n' "$(json_str "${REF_DESC:-none}")"
  printf '  "reference_totals": '
  awk '{ c[$1]++ } END { printf "{\"pass\": %d, \"fail\": %d, \"skip\": %d}", c["PASS"], c["FAIL"], c["SKIP"] }' "$REF_FILE"
  printf ',\n'
  printf '  "targets": {'
  first=1
  for l in ${LABELS[@]+"${LABELS[@]}"}; do
    [ $first = 1 ] || printf ','; first=0
    case $l in tgt) u="$TGT_URL" ;; tgt-thin) u="$TGT_THIN_URL" ;; grove) u="$GROVE_URL" ;; esac
    printf '\n    %s: {\n      "url": %s,\n' "$(json_str "$l")" "$(json_str "$u")"
    awk '
      { split($2, a, "."); c["total", $1]++; c[a[1], $1]++; r[++n] = $1 " " $2 }
      END {
        printf "      \"totals\": {\"pass\": %d, \"fail\": %d, \"skip\": %d, \"total\": %d},\n", c["total","PASS"], c["total","FAIL"], c["total","SKIP"], n
        printf "      \"families\": {\"SCSI\": {\"pass\": %d, \"fail\": %d, \"skip\": %d}, \"iSCSI\": {\"pass\": %d, \"fail\": %d, \"skip\": %d}},\n", c["SCSI","PASS"], c["SCSI","FAIL"], c["SCSI","SKIP"], c["iSCSI","PASS"], c["iSCSI","FAIL"], c["iSCSI","SKIP"]
        printf "      \"results\": {"
        for (i = 1; i <= n; i++) { split(r[i], f, " "); printf "%s\n        \"%s\": \"%s\"", (i > 1 ? "," : ""), f[2], f[1] }
        printf "\n      },\n"
      }' "$OUT/$l/results.txt"
    printf '      "groups": {'
    awk '{ printf "%s\n        \"%s\": {\"pass\": %d, \"fail\": %d, \"skip\": %d, \"exit_status\": %d, \"seconds\": %d}", (NR > 1 ? "," : ""), $1, $2, $3, $4, $5, $6 }' "$OUT/$l/groups.txt"
    printf '\n      }\n    }'
  done
  printf '\n  },\n'
  for kind in REGRESSION GAP OTHERFAIL FIXED; do
    case $kind in
      REGRESSION) key=regressions ;; GAP) key=skipped_by_grove_passed_by_reference ;;
      OTHERFAIL) key=other_grove_failures ;; FIXED) key=grove_passes_reference_fails ;;
    esac
    printf '  "%s": [' "$key"
    awk -v k="$kind" '$1 == k { printf "%s\"%s\"", (n++ ? ", " : ""), $2 }' "$COMPARE"
    printf '],\n'
  done
  ok=true
  [ "$N_REG" -gt 0 ] && ok=false
  [ "$STRICT" = 1 ] && [ $((N_GAP + N_OTHER)) -gt 0 ] && ok=false
  printf '  "strict": %s,\n' "$( [ "$STRICT" = 1 ] && echo true || echo false)"
  printf '  "ok": %s\n' "$ok"
  printf '}\n'
} > "$OUT/results.json"
[ -n "$JSON_COPY" ] && cp "$OUT/results.json" "$JSON_COPY"
say "results: $OUT/results.json, table: $OUT/table.txt"

if [ "$RUN_GROVE" = 1 ]; then
  if [ "$N_REG" -gt 0 ]; then
    say "FAIL: grove fails $N_REG test(s) that tgt passes"
    exit 1
  fi
  if [ "$STRICT" = 1 ] && [ $((N_GAP + N_OTHER)) -gt 0 ]; then
    say "FAIL (--strict): $N_GAP skipped where the reference passes, $N_OTHER other failures"
    exit 1
  fi
  if [ ${#REF_NAMES[@]} -gt 0 ]; then say "OK: no regressions against tgt"; else say "done (no reference)"; fi
fi
exit 0
