#!/usr/bin/env bash
# test/pg/packaging.sh: the release rules, as TAP ("1..N", ok / not ok, "# pass N", "# fail N"):
# the version is written once (sbpg.control's default_version, which the Makefile and META.json
# follow), every update script is installed, META.json validates against the PGXN Meta Spec,
# released scripts are unchanged and the update chain complete, and make dist builds the archive
# PGXN expects (and refuses when META.json disagrees). Needs node, git, unzip; no server.
# The dist checks run on a scratch copy of the working tree (tracked files as they are now), so
# uncommitted changes are checked too and the tree is left alone.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
scratch=$(mktemp -d /tmp/sbpg-packaging-XXXXXX)
trap 'rm -rf "$scratch"' EXIT

n=0
pass=0
fail=0
ok() { n=$((n + 1)); pass=$((pass + 1)); echo "ok $n - $1"; }
notok() {
	n=$((n + 1)); fail=$((fail + 1)); echo "not ok $n - $1"
	[ -n "${2:-}" ] && printf '%s\n' "$2" | sed 's/^/# /'
	return 0
}
# check NAME COMMAND...: ok when the command succeeds; its output is shown on failure.
check() {
	local name=$1 out
	shift
	if out=$("$@" 2>&1); then ok "$name"; else notok "$name" "$out"; fi
}

echo "1..10"
version=$(sed -n "s/^[[:space:]]*default_version[[:space:]]*=[[:space:]]*'\([^']*\)'.*/\1/p" sbpg.control)
distversion=$(node -e 'import("./test/pg/versions.mjs").then((m) => console.log(m.semver(m.defaultVersion())))')

# 1. The Makefile's version is derived from the control file, with no second literal.
mk=$(make -s --no-print-directory print-version 2>&1)
if [ -n "$version" ] && [ "$mk" = "$version" ] && ! grep -qE '^EXTVERSION[[:space:]]*:?=[[:space:]]*[0-9]' Makefile; then
	ok "the Makefile's EXTVERSION is sbpg.control's default_version ($version), not a literal"
else
	notok "the Makefile's EXTVERSION is sbpg.control's default_version" "control: '$version', make print-version: '$mk'"
fi

# 2. DATA installs every extension script (a new update script needs no Makefile edit).
data=$(make -s --no-print-directory print-data 2>&1 | tr ' ' '\n' | sort)
want=$(ls sql/sbpg--*.sql | sort)
if [ "$data" = "$want" ]; then ok "DATA installs every sql/sbpg--*.sql"; else notok "DATA installs every sql/sbpg--*.sql" "DATA: $data"$'\n'"scripts: $want"; fi

# 3-4. META.json: the spec's rules, then its versions against the control file.
check "META.json validates against the PGXN Meta Spec 1.0.0" env META_CHECK=spec node test/pg/meta-check.mjs
check "META.json's version and provides.sbpg.version are default_version $version as SemVer ($distversion)" env META_CHECK=versions node test/pg/meta-check.mjs

# 5-6. Released scripts, and the update chain.
check "released scripts match sql/released.sha256, and every script of a released version is listed" env RELEASED_CHECK=released node test/pg/released-check.mjs
check "the update chain reaches default_version $version from the first version, every earlier version on it" env RELEASED_CHECK=chain node test/pg/released-check.mjs

# A scratch repository holding the working tree's files (tracked and new, not ignored) as they are.
repo="$scratch/repo"
mkdir -p "$repo"
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents -P {} "$repo/" 2>/dev/null
(cd "$repo" && git init -q && git add -A && git -c user.name=packaging -c user.email=packaging@localhost commit -qm tree) >/dev/null 2>&1

# 7. make dist builds sbpg-<version>.zip.
zip="sbpg-$distversion.zip"
if out=$(make -s --no-print-directory -C "$repo" dist 2>&1) && [ -f "$repo/$zip" ]; then
	ok "make dist builds $zip"
else
	notok "make dist builds $zip" "$out"
fi

# 8. The archive: one top directory sbpg-<version>/, META.json, the control file, the Makefile and
# every extension script in it; nothing of the repository's plumbing or of a build.
if [ -f "$repo/$zip" ]; then
	list=$(unzip -Z1 "$repo/$zip")
	problems=""
	tops=$(printf '%s\n' "$list" | cut -d/ -f1 | sort -u)
	[ "$tops" = "sbpg-$distversion" ] || problems+="top directories: $tops"$'\n'
	for f in META.json sbpg.control Makefile README.md $(ls sql/sbpg--*.sql) sql/released.sha256; do
		printf '%s\n' "$list" | grep -qxF "sbpg-$distversion/$f" || problems+="missing: $f"$'\n'
	done
	bad=$(printf '%s\n' "$list" | grep -E '(^|/)(\.git/|\.gitignore$|\.gitattributes$|\.ci/|node_modules/)|\.(o|so|bc|zip)$' || true)
	[ -z "$bad" ] || problems+="should not ship: $bad"$'\n'
	unzip -p "$repo/$zip" "sbpg-$distversion/META.json" | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{process.exit(JSON.parse(s).version===process.argv[1]?0:1)})' "$distversion" \
		|| problems+="the archive's META.json does not name $distversion"$'\n'
	size=$(stat -c %s "$repo/$zip")
	[ "$size" -lt 5000000 ] || problems+="archive is $size bytes"$'\n'
	if [ -z "$problems" ]; then
		ok "the archive holds sbpg-$distversion/ with META.json, the control file and every script ($(printf '%s\n' "$list" | grep -vc '/$') files, $size bytes)"
	else
		notok "the archive holds what PGXN expects" "$problems"
	fi
else
	notok "the archive holds what PGXN expects" "no archive"
fi

# 9. make dist refuses when META.json names another version (and builds nothing).
(cd "$repo" && rm -f ./*.zip && sed -i '0,/"version": "[^"]*"/s//"version": "9.9.9"/' META.json &&
	git -c user.name=packaging -c user.email=packaging@localhost commit -qam "wrong version") >/dev/null 2>&1
if out=$(make -s --no-print-directory -C "$repo" dist 2>&1); then
	notok "make dist refuses a META.json whose version is not default_version" "$out"
elif ls "$repo"/*.zip >/dev/null 2>&1 || ! grep -q "versions: version" <<<"$out"; then
	notok "make dist refuses a META.json whose version is not default_version" "it failed, but not for the version, or left an archive:"$'\n'"$out"
else
	ok "make dist refuses a META.json whose version is not default_version"
fi
(cd "$repo" && git reset -q --hard HEAD~1)

# 10. make dist refuses when a released script changed (the archive would ship it).
first=$(sed -n '1s/^[0-9a-f]*  //p' sql/released.sha256)
if [ -n "$first" ]; then
	(cd "$repo" && echo "-- changed" >>"$first" && git -c user.name=packaging -c user.email=packaging@localhost commit -qam "change a released script") >/dev/null 2>&1
	if out=$(make -s --no-print-directory -C "$repo" dist 2>&1) || ! grep -q "changed after its release" <<<"$out"; then
		notok "make dist refuses a changed released script ($first)" "$out"
	else
		ok "make dist refuses a changed released script ($first)"
	fi
else
	notok "make dist refuses a changed released script" "sql/released.sha256 lists no script"
fi

echo "# pass $pass"
echo "# fail $fail"
[ "$fail" -eq 0 ]
