#!/usr/bin/env bash
# test/unit/run.sh: the extension's C++ unit tests, built plainly and with AddressSanitizer and
# UBSan (test/unit/build-asan); runs both. Prints TAP summary lines ("# pass N", "# fail N") for
# test/run; a sanitizer report makes the program exit non-zero, which test/run counts.
set -uo pipefail
cd "$(dirname "$0")"
make -s -j"$(nproc)" && make -s -j"$(nproc)" O=build-asan SANITIZE=1 || { echo "# fail 1"; exit 1; }
export ASAN_OPTIONS=abort_on_error=0:exitcode=86
export UBSAN_OPTIONS=print_stacktrace=1
rc=0
echo "--- plain build"
./sbpg_unit_test || rc=1
echo "--- ASan/UBSan build"
./build-asan/sbpg_unit_test || rc=1
exit $rc
