#!/usr/bin/env bash
# postfix's smtp-sink, a fast SMTP server that throws messages away, for the email notifier's tests and `make bench`.
# Nothing is installed: the Debian package is downloaded (`apt-get download postfix`) and unpacked (`dpkg -x`) into
# .cache/postfix in this checkout the first time.
#
#   scripts/smtp-sink.sh fetch                       # make sure it is there; prints the smtp-sink binary's path
#   scripts/smtp-sink.sh 127.0.0.1:2525 1000         # run it: every argument goes to smtp-sink
#   scripts/smtp-sink.sh -p 127.0.0.1:2525 1000      # ... without announcing PIPELINING (see `man smtp-sink`)
#
# As root, `-u nobody` is added (smtp-sink refuses to run as root without -u) unless -u is given.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${CM_POSTFIX_CACHE:-$root/.cache/postfix}"
sink="$cache/usr/sbin/smtp-sink"

fetch() {
    [ -x "$sink" ] && return 0
    command -v apt-get >/dev/null && command -v dpkg >/dev/null || {
        echo "smtp-sink.sh: apt-get and dpkg are needed to fetch postfix's smtp-sink (a Debian or Ubuntu system)" >&2
        return 1
    }
    local work
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' RETURN
    if ! (cd "$work" && apt-get download postfix >/dev/null 2>"$work/err"); then
        # A fresh machine may have no package lists yet: read them once, when allowed to.
        if [ "$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>&1 \
            && (cd "$work" && apt-get download postfix >/dev/null 2>"$work/err"); then
            :
        else
            echo "smtp-sink.sh: \`apt-get download postfix\` failed (run \`apt-get update\` as root once?):" >&2
            cat "$work/err" >&2
            return 1
        fi
    fi
    mkdir -p "$cache.tmp"
    dpkg -x "$work"/postfix_*.deb "$cache.tmp"
    rm -rf "$cache"
    mv "$cache.tmp" "$cache"
    [ -x "$sink" ] || { echo "smtp-sink.sh: no usr/sbin/smtp-sink in the postfix package" >&2; return 1; }
}

fetch
if [ "${1:-}" = fetch ]; then
    echo "$sink"
    exit 0
fi
args=("$@")
if [ "$(id -u)" = 0 ] && [[ " $* " != *" -u "* ]]; then
    args=(-u nobody "${args[@]}")
fi
LD_LIBRARY_PATH="$cache/usr/lib/postfix${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$sink" "${args[@]}"
