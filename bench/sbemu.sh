#!/usr/bin/env bash
# bench/sbemu.sh: how fast sbemu delivers to one Proton C++ peek-lock receiver and accepts from
# one sender, printed beside the Proton C++ example broker measured in the same run.
#
#   bench/sbemu.sh [MESSAGES] [ROUNDS]      (defaults 100000 and 3; the median round is shown)
#
# Full runs by hand; test/run's bench suite runs it with tiny counts so that it cannot rot. Needs
# the packages of test/setup, which include Debian's libqpid-proton11-dev-examples, whose
# broker.cpp is compiled here as the baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
ROUNDS=${2:-3}
BIN=bench/bin
mkdir -p "$BIN"

if [ ! -f /usr/share/proton/examples/cpp/broker.cpp ]; then
	if [ "$(id -u)" = 0 ]; then
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libqpid-proton11-dev-examples >/dev/null
	else
		echo "bench: install libqpid-proton11-dev-examples for the baseline broker" >&2
		exit 1
	fi
fi
PROTON_LIBS="-lqpid-proton-cpp -l:libqpid-proton-core.so.10 -l:libqpid-proton-proactor.so.1"
make -s sbemu
g++ -std=c++17 -O2 -o "$BIN/amqp_throughput" bench/amqp_throughput.cpp $PROTON_LIBS
if [ ! -x "$BIN/proton_broker" ] || [ /usr/share/proton/examples/cpp/broker.cpp -nt "$BIN/proton_broker" ]; then
	g++ -std=c++17 -O2 -pthread -I/usr/share/proton/examples/cpp -o "$BIN/proton_broker" \
		/usr/share/proton/examples/cpp/broker.cpp $PROTON_LIBS
fi

tmp=$(mktemp -d)
# The brokers start inside $(...) subshells: their pids go to files, which cleanup reads (a pid kept
# in a variable there was lost, and Proton's broker outlived the script, holding what it inherited).
cleanup() {
	for f in "$tmp"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; done
	rm -rf "$tmp"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

start_proton() {
	local port
	port=$(free_port)
	"$BIN/proton_broker" -a "127.0.0.1:$port" >"$tmp/proton.out" 2>&1 &
	echo $! >"$tmp/proton.pid"
	for _ in $(seq 100); do grep -q listening "$tmp/proton.out" && break; sleep 0.05; done
	echo "amqp://127.0.0.1:$port"
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

measure() { # name url -> "send_rate recv_rate"
	local url=$2 sends=() recvs=() r
	for i in $(seq "$ROUNDS"); do
		r=$("$BIN/amqp_throughput" send "$url" "bench$i" "$N" 100) || { echo "bench: send failed on $1" >&2; exit 1; }
		sends+=("${r##*rate=}")
		r=$("$BIN/amqp_throughput" recv "$url" "bench$i" "$N" 1000) || { echo "bench: receive failed on $1" >&2; exit 1; }
		recvs+=("${r##*rate=}")
	done
	echo "$(printf '%s\n' "${sends[@]}" | median) $(printf '%s\n' "${recvs[@]}" | median)"
}

# sbemu knows only configured entities: give it one queue per round.
sb_url=$(
	test/sbemu/sbemu $(for i in $(seq "$ROUNDS"); do printf -- '--queue bench%s ' "$i"; done) --listen 127.0.0.1:0 \
		>"$tmp/sbemu.out" 2>"$tmp/sbemu.err" &
	echo $! >"$tmp/sbemu.pid"
	for _ in $(seq 100); do grep -qs ready "$tmp/sbemu.out" && break; sleep 0.05; done
	grep -o 'amqp://[0-9.:]*' "$tmp/sbemu.out"
)
pb_url=$(start_proton)

read -r sb_send sb_recv < <(measure sbemu "$sb_url")
read -r pb_send pb_recv < <(measure proton-broker "$pb_url")

printf '\nsbemu throughput on %s (%s cores), %s messages of 100 bytes, median of %s rounds\n' \
	"$(uname -n)" "$(nproc)" "$N" "$ROUNDS"
printf '%-40s %15s %15s\n' "" "sbemu" "proton broker"
printf '%-40s %15s %15s\n' "send, 1 sender (msg/s)" "$sb_send" "$pb_send"
printf '%-40s %15s %15s\n' "peek-lock receive, credit 1000 (msg/s)" "$sb_recv" "$pb_recv"
printf '\nrequirement: receive >= 40000 msg/s, send >= 30000 msg/s\n'
if [ "$sb_recv" -ge 40000 ] && [ "$sb_send" -ge 30000 ]; then echo "result: met"; else echo "result: NOT met"; exit 1; fi
