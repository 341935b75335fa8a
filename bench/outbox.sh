#!/usr/bin/env bash
# bench/outbox.sh [MESSAGES] [PER_TX] [CLIENTS]: the outbox's throughput and latency beside the
# official JavaScript SDK sending the same messages in the same run. MESSAGES (default 50000)
# messages of about 100 bytes are queued by CLIENTS (default 4) SQL sessions in transactions of
# PER_TX (default 50) sbpg.send calls, while the publisher sends them (batch_size 100); the clock
# runs from the first commit to the last row marked sent, and each message's latency from its
# transaction's commit (as the client saw it return) to its row's sent_at (the broker had accepted
# it). The SDK sends the same number of messages with sendMessages in arrays of 100, awaited one
# after another (how a hand-written service sends a batch at a time), timed from the call to its
# resolution. One throwaway PostgreSQL 15 cluster (fsync off) and one sbemu. Builds and installs
# sbpg into the system PostgreSQL 15. Full runs by hand (figures in bench/README.md); test/run's
# bench suite runs it tiny.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-50000}
PER_TX=${2:-50}
CLIENTS=${3:-4}
sudo_() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
make -s -j"$(nproc)" all
sudo_ make -s install >/dev/null
# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_require bench/outbox.sh
bench_work outbox
cat >"$work/Config.json" <<JSON
{"UserConfig": {"Namespaces": [{"Name": "sbemulatorns", "Queues": [
  {"Name": "outbox", "Properties": {}}, {"Name": "sdk", "Properties": {}}
]}]}}
JSON
bench_sbemu --config "$work/Config.json"
bench_cluster
node bench/outbox.mjs "$amqp" "$control" "$PGHOST" "$PGPORT" "$N" "$PER_TX" "$CLIENTS"
