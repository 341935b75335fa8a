#!/usr/bin/env bash
# bench/memory.sh [MESSAGES] [LOCK_SECONDS]: the sbpg worker's memory while it drains MESSAGES
# messages (default 1000000) at batch 100, beside a plain backend doing the same SQL work, and a
# backpressure check: the handler's table locked for LOCK_SECONDS (default 20) while messages keep
# arriving. A throwaway PostgreSQL 15 cluster (fsync off, sbpg.log_messages = none) and sbemu on
# loopback; bench/memory.mjs does the work and prints the tables.
#
# Measures the sbpg build installed in the system PostgreSQL as it is: this script neither builds
# nor installs the extension (it builds sbemu when test/sbemu/sbemu is missing). Full runs by hand;
# test/run's bench suite runs it with tiny counts so that it cannot rot. Needs the packages test/setup installs and its npm modules
# (test/conformance/node_modules: @azure/service-bus, pg).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000000}
LOCK_S=${2:-20}
PGLIB=$(/usr/lib/postgresql/15/bin/pg_config --pkglibdir)
so="$PGLIB/sbpg.so"
[ -f "$so" ] || { echo "bench/memory.sh: $so is not installed (make install first)" >&2; exit 1; }
[ -x test/sbemu/sbemu ] || make -s sbemu
[ -d test/conformance/node_modules/@azure/service-bus ] || { echo "bench/memory.sh: run test/setup first (npm modules)" >&2; exit 1; }
[ -e bench/node_modules ] || ln -sfn ../test/conformance/node_modules bench/node_modules
build() { printf '%s (sha256 %s, installed %s)' "$so" "$(sha256sum "$so" | cut -c1-12)" "$(date -r "$so" '+%Y-%m-%d %H:%M:%S')"; }
build_before=$(build)

# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_work memory
bench_sbemu --queue mem
bench_cluster
psql -X -q -o /dev/null -v ON_ERROR_STOP=1 <<'SQL'
-- The plain backend's work: per message the handler, an inbox row and a NOTIFY; COMMIT every b.
CREATE PROCEDURE bench_sql(first bigint, n int, b int) LANGUAGE plpgsql AS $$
DECLARE
  m sbpg.message;
BEGIN
  FOR i IN 0..n - 1 LOOP
    -- By field name, so that a field added to sbpg.message does not break this (it did once).
    m := jsonb_populate_record(NULL::sbpg.message, jsonb_build_object(
           'message_id', 'sql-' || (first + i), 'sequence_number', first + i, 'enqueued_at', now(),
           'delivery_count', 0, 'subscription', 'sql', 'properties', '{}'::jsonb,
           'body', jsonb_build_object('id', first + i, 'customer', 'c' || (i % 50), 'amount', (i % 90) + 1,
                                      'note', repeat('x', 60))));
    PERFORM bench_handler(m);
    INSERT INTO sbpg.inbox (subscription, sequence_number, message_id, status, delivery_count, xid)
    VALUES ('sql', first + i, m.message_id, 'applied', 0, pg_current_xact_id());
    PERFORM pg_notify('bench_sql', json_build_object('subscription', 'sql', 'message_id', m.message_id,
                      'sequence_number', first + i, 'status', 'applied', 'xid', pg_current_xact_id()::text)::text);
    IF (i + 1) % b = 0 THEN COMMIT; END IF;
  END LOOP;
  COMMIT;
END $$;
SQL

echo "sbpg memory benchmark on $(uname -n) ($(nproc) cores), $(date -u '+%Y-%m-%d %H:%M UTC'), $N messages, lock $LOCK_S s"
echo "measuring $build_before"
echo "PostgreSQL $(psql -X -At -c 'SHOW server_version'), shared_buffers $(psql -X -At -c 'SHOW shared_buffers'), fsync off, sbpg.log_messages none"
echo "sbemu: queue 'mem' topped up in chunks (refilled to 50,000 available messages whenever fewer than 25,000 are left)"
SERIES_CSV="${SERIES_CSV:-}" node bench/memory.mjs "$amqp" "$control" "$PGHOST" "$PGPORT" "$N" "$LOCK_S" && rc=0 || rc=$?
if [ "$(build)" != "$build_before" ]; then
	echo "WARNING: the installed sbpg.so changed during the run (now $(build)); the server kept the build it loaded at start" >&2
fi
grep -E "terminated by signal|PANIC|out of memory" "$work/pg/server.log" >&2 || true
exit "$rc"
