#!/usr/bin/env bash
# test/pg/cluster.sh: a throwaway PostgreSQL 15 cluster with sbpg preloaded, for the shell-driven
# suites, the demo and the benchmarks.
#   test/pg/cluster.sh start DIR [PORT] [name=value ...]   initdb (as postgres when run as root) and start
#   test/pg/cluster.sh stop DIR                            stop (fast) and check the log for signals
# After start, DIR/env holds PGHOST/PGPORT/PGUSER/PGDATABASE exports.
set -euo pipefail
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
cmd=${1:?usage: cluster.sh start|stop DIR}
dir=${2:?usage: cluster.sh start|stop DIR}
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
case "$cmd" in
start)
	shift 2
	if [ $# -gt 0 ] && [[ $1 != *=* ]]; then
		port=$1
		shift
	else
		port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
	fi
	mkdir -p "$dir"
	chmod 777 "$dir"
	as_pg "$PGBIN/initdb" -D "$dir/data" --no-sync -A trust -U postgres -E UTF8 --locale=C >/dev/null
	{
		echo "shared_preload_libraries = 'sbpg'"
		echo "port = $port"
		echo "unix_socket_directories = '$dir'"
		echo "listen_addresses = ''"
		echo "fsync = off"
		echo "max_worker_processes = 40"
		echo "log_line_prefix = '%m [%p] %b: '"
		for kv in "$@"; do echo "${kv%%=*} = ${kv#*=}"; done
	} >>"$dir/data/postgresql.conf"
	as_pg "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null
	printf 'export PGHOST=%s PGPORT=%s PGUSER=postgres PGDATABASE=postgres\n' "$dir" "$port" >"$dir/env"
	;;
stop)
	as_pg "$PGBIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
	if grep -q "terminated by signal" "$dir/server.log" 2>/dev/null; then
		echo "cluster.sh: the server log shows a process terminated by a signal:" >&2
		grep "terminated by signal" "$dir/server.log" >&2
		exit 1
	fi
	;;
*)
	echo "usage: cluster.sh start|stop DIR" >&2
	exit 2
	;;
esac
