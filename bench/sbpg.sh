#!/usr/bin/env bash
# bench/sbpg.sh [MESSAGES] [LATENCY_MESSAGES] [ROUNDS]: sbpg end to end on this machine, for batch sizes 1, 10
# and 100, with fsync off and then on, beside what was measured in the same run:
#   (a) a bare Proton C++ peek-lock receiver draining the same sbemu (no PostgreSQL at all);
#   (b) the database ceiling: bench/ceiling's sbpg_bench_ceiling(), a C procedure that does per
#       message exactly sbpg's database work (the same sbpg.message, the handler as run_as through
#       fmgr, the same inbox row through a kept plan, the same NOTIFY) and commits every batch;
#   (c) a typical hand-written consumer: the official JS SDK's subscribe() with 16 concurrent
#       calls and a pg pool of 16, one transaction per message (the handler's insert and an inbox
#       row), then complete;
# and the same insert done by a set-based handler (sbpg.message[]) at batch 100.
# Throughput: a queue filled with MESSAGES (default 20000) is drained by a new subscription; the
# clock stops at the last NOTIFY. Throughputs and ceilings are measured ROUNDS times (default 3)
# and their medians printed, with every round's figure: on two cores one run varies by tens of
# percent. Latency: LATENCY_MESSAGES (default 10000) sent at 500 msg/s to a
# running subscription; per message, the time from the send call to its NOTIFY at a LISTEN
# client, split at the start of the transaction that applied it; and LATENCY_MESSAGES at half of
# batch 100's throughput from a paced C++ sender (bench/amqp_throughput.cpp paced) whose send
# times travel in the message bodies.
# Full runs by hand (figures in bench/README.md); test/run's bench suite runs it with tiny counts
# so that it cannot rot. Uses the packages test/setup installs; builds and installs sbpg and the
# bench-only ceiling module into the system PostgreSQL 15.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20000}
LAT_N=${2:-10000}
ROUNDS=${3:-3}
LAT_RATE=500
BIN=bench/bin
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
mkdir -p "$BIN"
test/setup >/dev/null
make -s -j"$(nproc)" all
sudo_() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
sudo_ make -s install >/dev/null
make -s -C bench/ceiling PG_CONFIG=$PG_CONFIG >/dev/null
sudo_ make -s -C bench/ceiling PG_CONFIG=$PG_CONFIG install >/dev/null
g++ -std=c++17 -O2 -o "$BIN/amqp_throughput" bench/amqp_throughput.cpp \
	-lqpid-proton-cpp -l:libqpid-proton-core.so.10 -l:libqpid-proton-proactor.so.1
ln -sfn ../test/conformance/node_modules bench/node_modules

# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_work bench

queues="--queue bare"
for f in off on; do
	queues="$queues --queue half-$f-100"
	for b in 1 10 100; do queues="$queues --queue lat-$f-$b"; done
	for r in $(seq "$ROUNDS"); do
		queues="$queues --queue hw-$f-$r --queue set-$f-100-$r"
		for b in 1 10 100; do queues="$queues --queue tp-$f-$b-$r"; done
	done
done
# shellcheck disable=SC2086
bench_sbemu $queues
bench_cluster
psql -X -q -v ON_ERROR_STOP=1 <<'SQL'
CREATE EXTENSION sbpg_bench_ceiling;
-- (c) the hand-written consumer's own inbox: a row per message id, in the message's transaction.
CREATE TABLE hw_inbox (message_id text PRIMARY KEY, sequence_number bigint, applied_at timestamptz NOT NULL DEFAULT now());
SQL

field() { sed -n "s/.*[ ^]$1=\([^ ]*\).*/\1/p"; }
fresh() { psql -X -q -c "TRUNCATE bench_orders, hw_inbox" -c "DELETE FROM sbpg.inbox WHERE subscription = 'ceiling'"; }

# (a) the bare receiver, once: PostgreSQL plays no part in it.
"$BIN/amqp_throughput" send "amqp://${amqp#amqp://}" bare "$N" 160 >/dev/null
bare=$("$BIN/amqp_throughput" recv "amqp://${amqp#amqp://}" bare "$N" 1000 | echo " $(cat)" | field rate)

declare -A tp ceil lat50 lat99 totx99 txn99 hw set half50 half99 halfrate
declare -A tp_r ceil_r hw_r set_r # every round's figures, space-separated
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
for f in off on; do
	psql -X -q -c "ALTER SYSTEM SET fsync = $f" -c "SELECT pg_reload_conf()" >/dev/null
	sleep 1
	for r in $(seq "$ROUNDS"); do
		fresh
		hw_r[$f]+=" $(node bench/sbpg_bench.mjs handwritten "$amqp" "$PGHOST" "$PGPORT" "hw-$f-$r" "$N" | echo " $(cat)" | field rate)"
		fresh
		set_r[$f]+=" $(node bench/sbpg_bench.mjs throughput "$amqp" "$PGHOST" "$PGPORT" 100 "$N" "set-$f-100-$r" 'bench_set_handler(sbpg.message[])' | echo " $(cat)" | field rate)"
		for b in 1 10 100; do
			fresh
			tp_r[$f$b]+=" $(node bench/sbpg_bench.mjs throughput "$amqp" "$PGHOST" "$PGPORT" "$b" "$N" "tp-$f-$b-$r" | echo " $(cat)" | field rate)"
			fresh
			ceil_r[$f$b]+=" $(node bench/sbpg_bench.mjs ceiling "$PGHOST" "$PGPORT" "$b" "$N" | echo " $(cat)" | field rate)"
		done
	done
	# shellcheck disable=SC2086
	{
		hw[$f]=$(median ${hw_r[$f]})
		set[$f]=$(median ${set_r[$f]})
		for b in 1 10 100; do
			tp[$f$b]=$(median ${tp_r[$f$b]})
			ceil[$f$b]=$(median ${ceil_r[$f$b]})
		done
	}
	for b in 1 10 100; do
		fresh
		line=" $(node bench/sbpg_bench.mjs latency "$amqp" "$PGHOST" "$PGPORT" "$b" "$LAT_N" "$LAT_RATE" "lat-$f-$b")"
		lat50[$f$b]=$(echo "$line" | field p50_ms)
		lat99[$f$b]=$(echo "$line" | field p99_ms)
		totx99[$f$b]=$(echo "$line" | field to_tx_p99_ms)
		txn99[$f$b]=$(echo "$line" | field tx_to_notify_p99_ms)
	done
	# Latency at half the maximum throughput (batch 100's), from a paced C++ sender: the JS SDK
	# cannot send that many single messages a second and time each one.
	fresh
	halfrate[$f]=$(( tp[${f}100] / 2 ))
	line=" $(node bench/sbpg_bench.mjs paced "$amqp" "$PGHOST" "$PGPORT" 100 "$LAT_N" "${halfrate[$f]}" "half-$f-100" "$BIN/amqp_throughput")"
	half50[$f]=$(echo "$line" | field p50_ms)
	half99[$f]=$(echo "$line" | field p99_ms)
done

pct() { echo $(( 100 * $1 / ($2 > 0 ? $2 : 1) )); }
printf '\nsbpg end to end on %s (%s cores), %s messages per throughput run, medians of %s rounds; PostgreSQL 15, synchronous_commit on;\n' "$(uname -n)" "$(nproc)" "$N" "$ROUNDS"
printf 'latency: %s messages at %s msg/s, send call -> NOTIFY (p99 split: send -> transaction start, transaction start -> NOTIFY)\n' "$LAT_N" "$LAT_RATE"
printf '(a) bare AMQP receiver: %s msg/s\n' "$bare"
for f in off on; do
	printf '\nfsync %s\n' "$f"
	printf '%-6s %12s %16s %9s %9s %9s %14s %14s\n' batch "sbpg msg/s" "(b) ceiling" "% of (b)" "p50 ms" "p99 ms" "p99 to tx ms" "p99 tx->ms"
	for b in 1 10 100; do
		printf '%-6s %12s %16s %8s%% %9s %9s %14s %14s\n' "$b" "${tp[$f$b]}" "${ceil[$f$b]}" "$(pct "${tp[$f$b]}" "${ceil[$f$b]}")" \
			"${lat50[$f$b]}" "${lat99[$f$b]}" "${totx99[$f$b]}" "${txn99[$f$b]}"
	done
	for b in 1 10 100; do
		printf 'rounds, batch %s: sbpg%s; ceiling%s\n' "$b" "${tp_r[$f$b]}" "${ceil_r[$f$b]}"
	done
	printf 'latency at half the maximum throughput (%s msg/s, batch 100, %s messages): p50 %s ms, p99 %s ms\n' \
		"${halfrate[$f]}" "$LAT_N" "${half50[$f]}" "${half99[$f]}"
	printf 'set-based handler (sbpg.message[]), batch 100: %s msg/s (per-message handler: %s; rounds%s)\n' "${set[$f]}" "${tp[${f}100]}" "${set_r[$f]}"
	printf '(c) hand-written consumer (JS SDK subscribe, 16 concurrent, pg pool 16): %s msg/s; sbpg at batch 100 is %s.%sx\n' \
		"${hw[$f]}" "$(( tp[${f}100] / (hw[$f] > 0 ? hw[$f] : 1) ))" "$(( 10 * tp[${f}100] / (hw[$f] > 0 ? hw[$f] : 1) % 10 ))"
	printf 'goals, fsync %s: batch 100 >= 80%% of (b): %s%%; batch 10 >= 60%% of (b): %s%%; >= 8x (c); p99 <= 5 ms at %s msg/s; p99 <= 20 ms at half the maximum\n' \
		"$f" "$(pct "${tp[${f}100]}" "${ceil[${f}100]}")" "$(pct "${tp[${f}10]}" "${ceil[${f}10]}")" "$LAT_RATE"
done
