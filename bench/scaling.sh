#!/usr/bin/env bash
# bench/scaling.sh [MESSAGES] [BATCH]: throughput of one subscription with 1, 2 and 4 workers (a
# plain queue), and with 1, 8 and 64 sessions (a session queue, the messages spread round robin,
# max_sessions 8 (the default), one worker; then 1 session with max_sessions 1 and 64 with 64),
# beside the in-server database ceiling measured in the same run
# (bench/ceiling's sbpg_bench_ceiling: sbpg's database work per message with a commit every BATCH,
# on one backend). Each drain: MESSAGES (default 100000) messages sent first, then a new
# subscription (batch BATCH, default 100) drains them; the clock runs from create_subscription to
# the last settlement in sbpg.stats. One throwaway PostgreSQL 15 cluster (fsync off) and one sbemu.
# Builds and installs sbpg and the ceiling module into the system PostgreSQL 15. Full runs by hand
# (figures in bench/README.md, used by docs/scaling.md); test/run's bench suite runs it tiny.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
BATCH=${2:-100}
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
sudo_() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
make -s -j"$(nproc)" all
sudo_ make -s install >/dev/null
make -s -C bench/ceiling PG_CONFIG=$PG_CONFIG >/dev/null
sudo_ make -s -C bench/ceiling PG_CONFIG=$PG_CONFIG install >/dev/null
# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_require bench/scaling.sh
bench_work scaling
cat >"$work/Config.json" <<JSON
{"UserConfig": {"Namespaces": [{"Name": "sbemulatorns", "Queues": [
  {"Name": "w1", "Properties": {"MaxDeliveryCount": 100}},
  {"Name": "w2", "Properties": {"MaxDeliveryCount": 100}},
  {"Name": "w4", "Properties": {"MaxDeliveryCount": 100}},
  {"Name": "s1", "Properties": {"MaxDeliveryCount": 100, "RequiresSession": true}},
  {"Name": "s8", "Properties": {"MaxDeliveryCount": 100, "RequiresSession": true}},
  {"Name": "s64", "Properties": {"MaxDeliveryCount": 100, "RequiresSession": true}},
  {"Name": "s1m1", "Properties": {"MaxDeliveryCount": 100, "RequiresSession": true}},
  {"Name": "s64m64", "Properties": {"MaxDeliveryCount": 100, "RequiresSession": true}}
]}]}}
JSON
bench_sbemu --config "$work/Config.json"
bench_cluster "max_worker_processes=24" "sbpg.max_workers=12"
psql -X -q -c "CREATE EXTENSION sbpg_bench_ceiling"

field() { sed -n "s/.*[ ^]$1=\([^ ]*\).*/\1/p"; }
# Every drain and ceiling run writes the same order ids: each starts from empty tables.
fresh() { psql -X -q -c "TRUNCATE bench_orders" -c "DELETE FROM sbpg.inbox WHERE subscription = 'ceiling'"; }
drain() {
	fresh
	node bench/scaling.mjs "$amqp" "$PGHOST" "$PGPORT" "$1" "$N" "$BATCH" "$2" "$3" | echo " $(cat)" | field rate
}
ceiling_run() {
	fresh
	node bench/sbpg_bench.mjs ceiling "$PGHOST" "$PGPORT" "$BATCH" "$N" | echo " $(cat)" | field rate
}

ceiling=$(ceiling_run)
declare -A rate
rate[w1]=$(drain w1 '{"workers": 1}' 0)
rate[w2]=$(drain w2 '{"workers": 2}' 0)
rate[w4]=$(drain w4 '{"workers": 4}' 0)
rate[s1]=$(drain s1 '{"session_idle_ms": 200}' 1)
rate[s8]=$(drain s8 '{"session_idle_ms": 200}' 8)
rate[s64]=$(drain s64 '{"session_idle_ms": 200}' 64)
rate[s1m1]=$(drain s1m1 '{"session_idle_ms": 200, "max_sessions": 1}' 1)
rate[s64m64]=$(drain s64m64 '{"session_idle_ms": 200, "max_sessions": 64}' 64)
ceiling2=$(ceiling_run)

printf '\nsbpg scaling on %s (%s cores), PostgreSQL 15, fsync off, batch %s, %s messages per drain\n' \
	"$(uname -n)" "$(nproc)" "$BATCH" "$N"
printf 'in-server ceiling (one backend, commit every %s): %s msg/s before the drains, %s after\n\n' "$BATCH" "$ceiling" "$ceiling2"
printf '%-22s %12s %12s\n' configuration "msg/s" "% ceiling"
row() { printf '%-22s %12s %11s%%\n' "$1" "$2" "$(( 100 * $2 / ceiling ))"; }
row "workers 1" "${rate[w1]}"
row "workers 2" "${rate[w2]}"
row "workers 4" "${rate[w4]}"
row "sessions 1" "${rate[s1]}"
row "sessions 8" "${rate[s8]}"
row "sessions 64" "${rate[s64]}"
row "sessions 1, max 1" "${rate[s1m1]}"
row "sessions 64, max 64" "${rate[s64m64]}"
