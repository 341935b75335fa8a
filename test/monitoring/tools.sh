#!/usr/bin/env bash
# test/monitoring/tools.sh: the monitoring tools docs/monitoring.md is checked with, taken from
# Debian 12's own packages without installing them as services: prometheus-postgres-exporter (the
# exporter) and prometheus (for promtool). Their .deb files are fetched with apt-get download and
# unpacked into a cache outside the clone, once.
#
#   test/monitoring/tools.sh prepare    fetch and unpack (no network once done)
#   test/monitoring/tools.sh bindir     print the directory with postgres_exporter and promtool
#
#   ${SBPG_PG_CACHE:-/var/cache/sbpg}/monitoring-<versions>/   the unpacked packages
#   ${SBPG_PG_CACHE:-/var/cache/sbpg}/monitoring               symlink to the complete one
set -euo pipefail

CACHE=${SBPG_PG_CACHE:-/var/cache/sbpg}
PKGS=(prometheus-postgres-exporter prometheus)
LINK=$CACHE/monitoring
MARK=.sbpg-complete

die() {
	echo "tools.sh: FAILED: $*" >&2
	exit 1
}

bindir() {
	[ -L "$LINK" ] && [ -f "$LINK/$MARK" ] || die "not prepared (test/monitoring/tools.sh prepare)"
	echo "$(readlink -f "$LINK")/usr/bin"
}

prepare() {
	if [ -L "$LINK" ] && [ -f "$LINK/$MARK" ]; then
		return 0
	fi
	mkdir -p "$CACHE"
	local tmp
	tmp=$(mktemp -d "$CACHE/monitoring-tmp-XXXXXX")
	chmod 755 "$tmp"
	# apt-get download works on the system's package lists; refresh them once if it cannot find one.
	if ! (cd "$tmp" && apt-get download -qq "${PKGS[@]}" 2>/dev/null); then
		apt-get update -qq >/dev/null
		(cd "$tmp" && apt-get download -qq "${PKGS[@]}") || die "apt-get download ${PKGS[*]}"
	fi
	local versions="" deb
	for deb in "$tmp"/*.deb; do
		dpkg-deb -x "$deb" "$tmp/root" || die "dpkg-deb -x $deb"
		versions+="-$(dpkg-deb -f "$deb" Version)"
	done
	rm -f "$tmp"/*.deb
	[ -x "$tmp/root/usr/bin/prometheus-postgres-exporter" ] && [ -x "$tmp/root/usr/bin/promtool" ] ||
		die "the packages hold no prometheus-postgres-exporter or promtool"
	local dest="$CACHE/monitoring${versions//[^A-Za-z0-9.+-]/_}"
	rm -rf "$dest"
	mv "$tmp/root" "$dest"
	rmdir "$tmp"
	touch "$dest/$MARK"
	ln -sfn "$dest" "$LINK"
}

case "${1:-}" in
prepare) prepare ;;
bindir) bindir ;;
*) die "usage: tools.sh prepare|bindir" ;;
esac
