#!/usr/bin/env bash
# bench/retention.sh [SECONDS] [RETENTION_S] [BATCH]: is throughput flat over a long sustained
# run while retention removes the inbox rows behind it? One throwaway PostgreSQL 15 cluster
# (fsync off, sbpg.inbox_retention = RETENTION_S) and one sbemu; a subscription (batch BATCH,
# default 100) drains a queue that a sender keeps topped up for SECONDS (default 3600), so the
# worker never waits for messages. Every sampling interval (a minute, or a quarter of a short run)
# prints the interval's rate, the queue's depth, the inbox's live and dead rows, its size on disk
# and the autovacuum runs so far; at the end, the rate of the first and last sixths of the part of
# the run during which retention was removing rows, and their ratio (the goal: within 10%).
# RETENTION_S defaults to 600. Measures the sbpg build installed in the system PostgreSQL (make
# install first). Full runs by hand (figures in bench/README.md); test/run's bench suite runs it
# for a few seconds so that it cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TOTAL=${1:-3600}
RETENTION=${2:-600}
BATCH=${3:-100}
# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_require bench/retention.sh
bench_work retention
bench_sbemu --queue sustained
bench_cluster "max_wal_size=4GB" "sbpg.inbox_retention=${RETENTION}s"

printf 'sbpg: a sustained drain of %s s with sbpg.inbox_retention = %s s, on %s (%s cores);\n' \
	"$SECONDS_TOTAL" "$RETENTION" "$(uname -n)" "$(nproc)"
printf 'PostgreSQL 15, fsync off, batch %s; the sender keeps the queue topped up\n\n' "$BATCH"
node bench/retention.mjs "$amqp" "$control" "$PGHOST" "$PGPORT" "$SECONDS_TOTAL" "$RETENTION" "$BATCH"
