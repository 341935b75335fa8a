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
# A test program that dies says so, in the words test/run looks for.
run() {
	"$@"
	local r=$?
	if [ $r -gt 128 ]; then
		echo "test/unit: $1 terminated by signal $((r - 128))"
		echo "# fail 1"
	fi
	[ $r -eq 0 ] || rc=1
}
echo "--- plain build"
run ./sbpg_unit_test
run ./sbpg_schema_test
run ./sbpg_message_test
run ./sbpg_text_test
echo "--- ASan/UBSan build"
run ./build-asan/sbpg_unit_test
run ./build-asan/sbpg_schema_test
run ./build-asan/sbpg_message_test
run ./build-asan/sbpg_text_test
exit $rc
