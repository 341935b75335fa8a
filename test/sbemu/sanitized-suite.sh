#!/usr/bin/env bash
# test/sbemu/sanitized-suite.sh: builds sbemu and its tests with AddressSanitizer and UBSan into
# test/sbemu/build-asan, then runs the unit, protocol and SDK conformance tests against that build.
# A memory error or undefined behaviour makes sbemu exit non-zero, which fails the test in
# progress. Prints TAP summary lines ("# pass N", "# fail N") for test/run.
set -uo pipefail
cd "$(dirname "$0")/../.."
make -s -j"$(nproc)" -C test/sbemu O=build-asan SANITIZE=1 all tests || { echo "# fail 1"; exit 1; }
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:exitcode=86
export UBSAN_OPTIONS=print_stacktrace=1
export SBEMU_BIN=$PWD/test/sbemu/build-asan/sbemu
rc=0
test/sbemu/build-asan/tests/sbemu_unit_test || rc=1
test/sbemu/build-asan/tests/sbemu_protocol_test || rc=1
out=$(mktemp)
node --test --test-reporter=tap test/conformance/*.test.mjs >"$out" 2>&1 || rc=1
grep -E '^(not ok|ok|# (pass|fail))|AddressSanitizer|runtime error' "$out"
rm -f "$out"
exit $rc
