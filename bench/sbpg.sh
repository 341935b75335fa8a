#!/usr/bin/env bash
# bench/sbpg.sh [MESSAGES] [LATENCY_MESSAGES]: sbpg end to end on this machine, for batch sizes 1, 10 and 100, beside
# two ceilings measured in the same run:
#   (a) a bare Proton C++ peek-lock receiver draining the same sbemu (no PostgreSQL at all);
#   (b) the same handler, inbox row and NOTIFY driven from SQL alone (no AMQP), committing every
#       batch of the same size.
# Throughput: a queue filled with MESSAGES (default 20000) is drained by a new subscription; the
# clock stops at the last NOTIFY. Latency: LATENCY_MESSAGES (default 2000) sent at 500 msg/s to a
# running subscription; per message, the time from the send call to its NOTIFY at a LISTEN client.
# Full runs by hand (figures in bench/README.md); test/run's bench suite runs it with tiny counts
# so that it cannot rot. Uses the packages test/setup installs.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20000}
LAT_N=${2:-2000}
LAT_RATE=500
BIN=bench/bin
mkdir -p "$BIN"
test/setup >/dev/null
make -s -j"$(nproc)" all
if [ "$(id -u)" -eq 0 ]; then make -s install >/dev/null; else sudo make -s install >/dev/null; fi
g++ -std=c++17 -O2 -o "$BIN/amqp_throughput" bench/amqp_throughput.cpp \
	-lqpid-proton-cpp -l:libqpid-proton-core.so.10 -l:libqpid-proton-proactor.so.1
ln -sfn ../test/conformance/node_modules bench/node_modules

work=$(mktemp -d /tmp/sbpg-bench-XXXXXX)
chmod 755 "$work"
cleanup() {
	[ -n "${emu_pid:-}" ] && kill "$emu_pid" 2>/dev/null && wait "$emu_pid" 2>/dev/null
	test/pg/cluster.sh stop "$work/pg" >/dev/null 2>&1 || true
	rm -rf "$work"
}
trap cleanup EXIT

queues=""
for b in 1 10 100; do queues="$queues --queue tp-$b --queue lat-$b"; done
# shellcheck disable=SC2086
test/sbemu/sbemu $queues --queue bare --listen 127.0.0.1:0 --log-level error >"$work/ready" 2>"$work/sbemu.err" &
emu_pid=$!
for _ in $(seq 100); do grep -q "sbemu ready" "$work/ready" && break; sleep 0.05; done
amqp=$(grep -o 'amqp=amqp://[^ ]*' "$work/ready" | sed 's|amqp=||')

test/pg/cluster.sh start "$work/pg" "sbpg.log_messages=none" >/dev/null
# shellcheck disable=SC1091
. "$work/pg/env"
psql -X -q -v ON_ERROR_STOP=1 <<'SQL'
CREATE EXTENSION sbpg;
CREATE ROLE bench_writer NOLOGIN;
CREATE TABLE bench_orders (id bigint PRIMARY KEY, customer text, amount numeric, note text, message_id text);
GRANT INSERT ON bench_orders TO bench_writer;
CREATE FUNCTION bench_handler(m sbpg.message) RETURNS void LANGUAGE sql AS $$
  INSERT INTO public.bench_orders VALUES ((m.body->>'id')::bigint, m.body->>'customer', (m.body->>'amount')::numeric,
                                          m.body->>'note', m.message_id) $$;
GRANT EXECUTE ON FUNCTION bench_handler(sbpg.message) TO bench_writer;
SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}');
-- Ceiling (b): per message the handler, an inbox row and a NOTIFY; COMMIT every batch.
CREATE PROCEDURE bench_sql(n int, b int) LANGUAGE plpgsql AS $$
DECLARE
  i int := 0;
  m sbpg.message;
BEGIN
  WHILE i < n LOOP
    FOR k IN 1..b LOOP
      EXIT WHEN i >= n;
      i := i + 1;
      -- By field name, so that a field added to sbpg.message does not break this (it did once).
      m := jsonb_populate_record(NULL::sbpg.message, jsonb_build_object(
             'message_id', 'sql-' || i, 'sequence_number', i, 'enqueued_at', now(), 'delivery_count', 0,
             'subscription', 'sql', 'properties', '{}'::jsonb,
             'body', jsonb_build_object('id', 2000000 + i, 'customer', 'c' || (i % 50), 'amount', (i % 90) + 1,
                                        'note', repeat('x', 60))));
      PERFORM bench_handler(m);
      INSERT INTO sbpg.inbox (subscription, sequence_number, message_id, status, delivery_count, xid)
      VALUES ('sql', 3000000 + i, m.message_id, 'applied', 0, pg_current_xact_id());
      PERFORM pg_notify('bench_sql', json_build_object('subscription', 'sql', 'message_id', m.message_id,
                        'sequence_number', i, 'status', 'applied', 'xid', pg_current_xact_id()::text)::text);
    END LOOP;
    COMMIT;
  END LOOP;
END $$;
SQL

field() { sed -n "s/.*$1=\([^ ]*\).*/\1/p"; }

# Ceiling (a): the bare receiver.
"$BIN/amqp_throughput" send "amqp://${amqp#amqp://}" bare "$N" 160 >/dev/null
bare=$("$BIN/amqp_throughput" recv "amqp://${amqp#amqp://}" bare "$N" 1000 | field rate)

declare -A tp lat50 lat99 sqlr
for b in 1 10 100; do
	tp[$b]=$(node bench/sbpg_bench.mjs throughput "$amqp" "$PGHOST" "$PGPORT" "$b" "$N" | field rate)
	sqlr[$b]=$(node bench/sbpg_bench.mjs sql "$PGHOST" "$PGPORT" "$b" "$N" | field rate)
	psql -X -q -c "TRUNCATE bench_orders; DELETE FROM sbpg.inbox WHERE subscription = 'sql'"
	line=$(node bench/sbpg_bench.mjs latency "$amqp" "$PGHOST" "$PGPORT" "$b" "$LAT_N" "$LAT_RATE")
	lat50[$b]=$(echo "$line" | field p50_ms)
	lat99[$b]=$(echo "$line" | field p99_ms)
done

printf '\nsbpg end to end on %s (%s cores), %s messages per throughput run; PostgreSQL 15, fsync off,\n' "$(uname -n)" "$(nproc)" "$N"
printf 'synchronous_commit on (sbpg flushes every commit before settling anyway); latency: %s messages at %s msg/s\n\n' "$LAT_N" "$LAT_RATE"
printf '%-6s %12s %14s %14s %10s %12s %12s\n' batch "sbpg msg/s" "(a) bare AMQP" "(b) SQL alone" "% of min" "p50 ms" "p99 ms"
for b in 1 10 100; do
	lower=$(( bare < sqlr[$b] ? bare : sqlr[$b] ))
	printf '%-6s %12s %14s %14s %9s%% %12s %12s\n' "$b" "${tp[$b]}" "$bare" "${sqlr[$b]}" "$(( 100 * tp[$b] / lower ))" "${lat50[$b]}" "${lat99[$b]}"
done
lower100=$(( bare < sqlr[100] ? bare : sqlr[100] ))
echo
echo "goal: batch 100 at least 80% of the lower ceiling: $(( 100 * tp[100] / lower100 ))%"
