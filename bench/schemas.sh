#!/usr/bin/env bash
# bench/schemas.sh [MESSAGES]: what validating messages against registered JSON Schemas costs.
#   1. per message, on the AMQP thread (bench/classify_bench.cpp): CheckJson alone (every message
#      pays it) beside Registry::Classify (type, version, draft-04 validation), 200,000 messages;
#   2. end to end (bench/schemas.mjs): sbpg throughput with "schemas": "off" and "validate", the same
#      run, MESSAGES (default 20,000) per queue, batch 100.
# Full runs by hand; test/run's bench suite runs it with tiny counts so that it cannot rot. Needs
# what test/setup installs and the extension installed.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20000}
mkdir -p bench/bin
g++ -std=c++17 -O2 -Iinclude -o bench/bin/classify_bench bench/classify_bench.cpp src/schema/schema.cpp src/schema/compat.cpp \
	src/schema/registry.cpp src/message/message.cpp src/amqp/codec_*.cpp src/core/text.cpp -lssl -lcrypto
echo "== per message, AMQP thread"
bench/bin/classify_bench 200000
echo "== end to end, batch 100"
node bench/schemas.mjs "$N"
