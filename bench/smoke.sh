#!/usr/bin/env bash
# bench/smoke.sh: every benchmark script under bench/, run with tiny counts so that none can rot
# (test/run's bench suite). Asserts no timing: a script passes when it exits 0 and prints its
# table (a line each script always prints with its figures). Prints TAP with "# pass N" /
# "# fail N" lines. Full runs are by hand; their figures go in bench/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d /tmp/sbpg-bench-smoke-XXXXXX)
trap 'rm -rf "$out"' EXIT
# name | command | a line of its table (extended regular expression)
checks=(
	"sbemu.sh|bench/sbemu.sh 2000 1|^peek-lock receive, credit 1000 \(msg/s\) +[0-9]+ +[0-9]+"
	"sbpg.sh|bench/sbpg.sh 300 50 2|^100 +[0-9]+ +[0-9]+ +[0-9]+% +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+"
	"schemas.sh|bench/schemas.sh 300|^messages=300 off_msg_s=[0-9]+ on_msg_s=[0-9]+"
	"inbox_scale.sh|bench/inbox_scale.sh 500 2000|^full/empty: [0-9]+%"
	"memory.sh|bench/memory.sh 2000 2|^during the lock: locked at most [0-9]+ \(bound 1000\)"
	"retention.sh|bench/retention.sh 24 4 10|^last/first: [0-9]+% \(goal: within 10%\)"
	"scaling.sh|bench/scaling.sh 400 50|^sessions 64 +[0-9]+ +[0-9]+%"
	"outbox.sh|bench/outbox.sh 1000 50 2|^messages/s +[0-9]+ +[0-9]+"
)
echo "1..${#checks[@]}"
pass=0
fail=0
n=0
for c in "${checks[@]}"; do
	IFS='|' read -r name cmd table <<<"$c"
	n=$((n + 1))
	log="$out/$name.log"
	# shellcheck disable=SC2086
	timeout 600 $cmd >"$log" 2>&1
	rc=$?
	if [ $rc -eq 0 ] && grep -qE "$table" "$log"; then
		echo "ok $n - bench/$name runs at a tiny size and prints its table"
		grep -E "$table" "$log" | head -1 | sed 's/^/# /'
		pass=$((pass + 1))
	else
		echo "not ok $n - bench/$name runs at a tiny size and prints its table (exit $rc)"
		tail -20 "$log" | sed 's/^/# /'
		fail=$((fail + 1))
	fi
done
echo "# pass $pass"
echo "# fail $fail"
[ $fail -eq 0 ]
