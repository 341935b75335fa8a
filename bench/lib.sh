# bench/lib.sh: what the benchmark scripts share; sourced from the project root, after set -e.
#   bench_require SCRIPT        refuses to go on (naming SCRIPT) unless sbpg is installed in the
#                               PostgreSQL of $PGBIN (default the system's 15) and the npm modules are
#                               there; builds sbemu if needed and links bench/node_modules
#   bench_work NAME             a work directory ($work) under /tmp, removed at exit with the
#                               emulator and the cluster started in it
#   bench_sbemu ARG...          sbemu with ARG... (its entities) on loopback ports; sets $amqp and
#                               $control
#   bench_cluster SETTING...    a throwaway PostgreSQL cluster in $work/pg (test/pg/cluster.sh; $PGBIN
#                               chooses the server) with sbpg.log_messages = none and SETTING...,
#                               its environment exported and bench/setup.sql loaded
bench_require() {
	local lib
	lib=$("${PGBIN:-/usr/lib/postgresql/15/bin}/pg_config" --pkglibdir)
	[ -f "$lib/sbpg.so" ] || { echo "$1: $lib/sbpg.so is not installed (make install first)" >&2; exit 1; }
	[ -x test/sbemu/sbemu ] || make -s sbemu
	[ -d test/conformance/node_modules/@azure/service-bus ] || { echo "$1: run test/setup first (npm modules)" >&2; exit 1; }
	[ -e bench/node_modules ] || ln -sfn ../test/conformance/node_modules bench/node_modules
}

bench_work() {
	work=$(mktemp -d "/tmp/sbpg-$1-XXXXXX")
	chmod 755 "$work"
	trap bench_cleanup EXIT
}

bench_cleanup() {
	[ -n "${emu_pid:-}" ] && kill "$emu_pid" 2>/dev/null && wait "$emu_pid" 2>/dev/null
	test/pg/cluster.sh stop "$work/pg" >/dev/null 2>&1 || true
	rm -rf "$work"
}

bench_sbemu() {
	test/sbemu/sbemu "$@" --listen 127.0.0.1:0 --control 127.0.0.1:0 --log-level error >"$work/ready" 2>"$work/sbemu.err" &
	emu_pid=$!
	for _ in $(seq 100); do grep -q "sbemu ready" "$work/ready" && break; sleep 0.05; done
	amqp=$(grep -o 'amqp=amqp://[^ ]*' "$work/ready" | sed 's|amqp=||')
	control=$(grep -o 'control=http://[^ ]*' "$work/ready" | sed 's|control=||')
	[ -n "$amqp" ] || { echo "sbemu did not start: $(cat "$work/sbemu.err")" >&2; return 1; }
}

bench_cluster() {
	test/pg/cluster.sh start "$work/pg" "sbpg.log_messages=none" "$@" >/dev/null
	# shellcheck disable=SC1091
	. "$work/pg/env"
	psql -X -q -o /dev/null -v ON_ERROR_STOP=1 -f bench/setup.sql
}
