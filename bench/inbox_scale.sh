#!/usr/bin/env bash
# bench/inbox_scale.sh [MESSAGES] [PREFILLED] [BATCH]: does sbpg's work per batch depend on the
# size of the inbox? In one run, on one throwaway PostgreSQL 15 cluster and one sbemu:
#   (1) a subscription drains MESSAGES (default 1000000) into an empty sbpg.inbox;
#   (2) PREFILLED rows (default 5000000) of a second subscription are written to sbpg.inbox
#       (settled, as a week of retention leaves them), the table is vacuumed and analyzed, a
#       checkpoint writes them out, and that subscription drains MESSAGES more.
# Prints both rates, each with the rates of its first and last tenth, and their ratio (the goal:
# within 10%). BATCH defaults to 100. Measures the sbpg build installed in the system
# PostgreSQL (make install first). Full runs by hand (figures in bench/README.md); test/run's
# bench suite runs it with tiny counts so that it cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000000}
PRE=${2:-5000000}
BATCH=${3:-100}
# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_require bench/inbox_scale.sh
bench_work inbox-scale
bench_sbemu --queue empty --queue full
bench_cluster "max_wal_size=4GB"

empty=$(node bench/inbox_scale.mjs "$amqp" "$control" "$PGHOST" "$PGPORT" empty "$N" "$BATCH")
psql -X -q -c "TRUNCATE bench_orders"

t0=$(date +%s)
# Sequence numbers far above sbemu's, message ids of another shape: none of them is a duplicate.
psql -X -q -v ON_ERROR_STOP=1 -v pre="$PRE" <<'SQL'
INSERT INTO sbpg.inbox (subscription, sequence_number, message_id, status, delivery_count, xid, recorded_at, settled_at)
SELECT 'full', 1000000000000 + g, 'prefilled-' || g, 'applied', 1, pg_current_xact_id(), now() - interval '1 day',
       now() - interval '1 day'
FROM generate_series(1, :pre) g;
VACUUM (ANALYZE) sbpg.inbox;
CHECKPOINT; -- a server that has run for a week has written its old pages out: not the drain's work
SQL
prefill_s=$(( $(date +%s) - t0 ))
rows=$(psql -X -At -c "SELECT count(*) FROM sbpg.inbox")
full=$(node bench/inbox_scale.mjs "$amqp" "$control" "$PGHOST" "$PGPORT" full "$N" "$BATCH")

field() { sed -n "s/.*[ ^]$1=\([^ ]*\).*/\1/p"; }
printf '\nsbpg: draining into an empty inbox and into one that holds %s rows, on %s (%s cores);\n' "$PRE" "$(uname -n)" "$(nproc)"
printf 'PostgreSQL 15, fsync off, batch %s, %s messages per drain (prefill took %s s; %s inbox rows before the second drain)\n\n' \
	"$BATCH" "$N" "$prefill_s" "$rows"
printf '%-22s %12s %16s %16s\n' inbox "msg/s" "first tenth" "last tenth"
for r in empty full; do
	line=${!r}
	label=$([ $r = empty ] && echo "empty" || echo "$PRE rows")
	printf '%-22s %12s %16s %16s\n' "$label" "$(echo " $line" | field rate)" "$(echo " $line" | field first_tenth)" "$(echo " $line" | field last_tenth)"
done
e=$(echo " $empty" | field rate)
f=$(echo " $full" | field rate)
echo
echo "full/empty: $(( 100 * f / e ))% (goal: at least 90%)"
