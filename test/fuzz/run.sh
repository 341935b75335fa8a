#!/usr/bin/env bash
# test/fuzz/run.sh [SECONDS]: builds and runs the message-decoding fuzz suite and prints TAP
# ("ok N - ...", "# pass N", "# fail N") for test/run:
#   1. the regression tests of test/unit/message_test.cpp (ASan/UBSan);
#   2. decode_fuzzer (libFuzzer, ASan/UBSan) for SECONDS (default 60) from the seed corpus
#      (make-seeds.py) plus the corpus kept from earlier runs in test/fuzz/work/corpus;
#   3. the pipeline run, test/fuzz/pipeline.test.mjs (SBPG_FUZZ_MESSAGES, default 10000), unless
#      SBPG_FUZZ_PIPELINE=0. It uses the sbpg installed in the server's directories.
set -uo pipefail
cd "$(dirname "$0")"
SECONDS_BUDGET=${1:-60}
export ASAN_OPTIONS=abort_on_error=0:exitcode=86:detect_leaks=1
export UBSAN_OPTIONS=suppressions=$PWD/ubsan.supp:print_stacktrace=1:halt_on_error=1
n=0 pass=0 fail=0
result() { # result OK NAME
	n=$((n + 1))
	if [ "$1" -eq 0 ]; then pass=$((pass + 1)); echo "ok $n - $2"; else fail=$((fail + 1)); echo "not ok $n - $2"; fi
}
finish() { echo "1..$n"; echo "# pass $pass"; echo "# fail $fail"; [ "$fail" -eq 0 ]; exit $?; }

if ! make -s -j"$(nproc)" >build.log 2>&1; then
	cat build.log
	result 1 "build decode_fuzzer and message_test (clang++ with libFuzzer; test/setup installs clang-14 libclang-rt-14-dev)"
	finish
fi
result 0 "build decode_fuzzer and message_test"

./message_test >message_test.log 2>&1
rc=$?
sed 's/^/# /' message_test.log
result $rc "message regression tests (test/unit/message_test.cpp, ASan/UBSan): $(grep -E '^# pass' message_test.log)"

mkdir -p work/corpus work/seeds work/artifacts
python3 make-seeds.py work/seeds >/dev/null
./decode_fuzzer -max_total_time="$SECONDS_BUDGET" -rss_limit_mb=4096 -max_len=65536 -timeout=30 -print_final_stats=1 \
	-artifact_prefix=work/artifacts/ work/corpus work/seeds >work/fuzz.log 2>&1
rc=$?
grep -E "^(stat::|Done)" work/fuzz.log | sed 's/^/# /'
runs=$(grep -oE "^Done [0-9]+ runs in [0-9]+ second" work/fuzz.log | head -1)
if [ $rc -ne 0 ]; then
	grep -E "INVARIANT|ERROR|SUMMARY|runtime error|Test unit written" work/fuzz.log | head -20 | sed 's/^/# /'
fi
result $rc "decode_fuzzer for ${SECONDS_BUDGET}s: ${runs:-no summary}, corpus $(ls work/corpus | wc -l) inputs"

# The schema registry core, for a third of the budget (at least 10 s).
SCHEMA_BUDGET=$((SECONDS_BUDGET / 3 < 10 ? 10 : SECONDS_BUDGET / 3))
mkdir -p work/schema-corpus
./schema_fuzzer -max_total_time="$SCHEMA_BUDGET" -rss_limit_mb=4096 -max_len=16384 -timeout=30 -print_final_stats=1 \
	-artifact_prefix=work/artifacts/schema- work/schema-corpus >work/schema-fuzz.log 2>&1
rc=$?
grep -E "^(stat::|Done)" work/schema-fuzz.log | sed 's/^/# /'
runs=$(grep -oE "^Done [0-9]+ runs in [0-9]+ second" work/schema-fuzz.log | head -1)
if [ $rc -ne 0 ]; then
	grep -E "INVARIANT|ERROR|SUMMARY|runtime error|Test unit written" work/schema-fuzz.log | head -20 | sed 's/^/# /'
fi
result $rc "schema_fuzzer for ${SCHEMA_BUDGET}s: ${runs:-no summary}, corpus $(ls work/schema-corpus | wc -l) inputs"

if [ "${SBPG_FUZZ_PIPELINE:-1}" != 0 ]; then
	node --test --test-reporter=tap pipeline.test.mjs >work/pipeline.log 2>&1
	rc=$?
	grep -E "pipeline fuzz:|not ok|error:|problems" work/pipeline.log | sed 's/^# //; s/^/# /' | head -60
	result $rc "pipeline: ${SBPG_FUZZ_MESSAGES:-10000} malformed messages through sbemu, PostgreSQL and sbpg, all accounted for"
fi
finish
