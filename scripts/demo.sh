#!/usr/bin/env bash
# `make demo`: a short cm session on a throwaway database. Nothing outside a temporary folder is touched.
set -euo pipefail
cd "$(dirname "$0")/.."

CM="$PWD/.venv/bin/cm"
CM_PYTHON="$PWD/.venv/bin/python"
workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT
# Every cm below uses this database (and no config file from here or from ~/.config).
export CM_DATABASE_URL="$workdir/demo.db"
export XDG_CONFIG_HOME="$workdir/config"
export XDG_DATA_HOME="$workdir/data"
unset CM_CONFIG CM_QUEUE_URL
cd "$workdir"

bold="" plain=""
if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; fi

# Print the command (quoted where a shell would need it), then run it.
step() {
    local line="" arg
    for arg in "$@"; do
        if [[ $arg =~ ^[A-Za-z0-9@._/=:,+-]+$ ]]; then line+=" $arg"; else line+=" \"$arg\""; fi
    done
    printf '\n%s$ cm%s%s\n' "$bold" "$line" "$plain"
    "$CM" "$@"
}

# A database named by CM_DATABASE_URL (or --database, or database.url) is created by `cm db upgrade` only, so
# that a mistyped path is an error rather than a new, empty database.
step db upgrade
step group create newsletter --description "Monthly news"
step group add-recipients newsletter \
    --email ada@example.com --email Grace@Example.com --email alan@example.com --email ADA@example.com
step recipient opt-out alan@example.com --reason "asked by phone"
step recipient active
step group show newsletter
cat >may.txt <<'TXT'
Hello {{ name or "friend" }}!

This is our monthly news{% if City is defined %}, with a word for everyone in {{ City }}{% endif %}.

Unsubscribe: {{ unsubscribe_url }}
TXT
step campaign create --title "May news" --subject "What's new in May, {{ name or 'friend' }}" --text-file may.txt \
    --group newsletter --recipient alan@example.com
step campaign show 1
# An opted-out address stays out, whatever is tried, until an explicit opt-in.
step group add-recipients newsletter --email alan@example.com
step recipient export alan@example.com

# A CSV import through the queue: the command returns at once, the worker does the work.
cat >people.csv <<'CSV'
Email Address;Name;City
katherine@example.com;Katherine Johnson;White Sulphur Springs
dorothy@example.com;Dorothy Vaughan;Kansas City
not-an-address;Nobody;Nowhere
KATHERINE@example.com;Duplicate;Somewhere
alan@example.com;Alan (opted out);London
CSV
step group add-recipients newsletter --csv people.csv
step jobs list
step worker --drain
step jobs show 1
step jobs show 1 --rejects
step group show newsletter

# Sending: the messages go to a folder (the outbox notifier), named explicitly: cm has no default notifier. Their
# unsubscribe links point at `cm serve` (serve.base_url), started further down.
port="$("$CM_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
cat >campaign.toml <<TOML
[send]
from = "News <news@example.com>"

[unsubscribe]
mailto = "unsubscribe@example.com"

[serve]
base_url = "http://127.0.0.1:$port"

[notifiers.outbox]
path = "outbox"
TOML
step campaign preview 1 --recipient katherine@example.com
step campaign send 1 --notifier outbox
step worker --drain
step campaign stats 1
step campaign deliveries 1
step campaign send 1
printf '\n%s$ ls outbox%s\n' "$bold" "$plain"
ls outbox

# `cm serve` answers the links: a mail provider's one-click unsubscribe is a POST of List-Unsubscribe=One-Click.
printf '\n%s$ cm serve --port %s &%s\n' "$bold" "$port" "$plain"
"$CM" serve --port "$port" &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -rf "$workdir"' EXIT
"$CM_PYTHON" - "$port" <<'PY'
import email, pathlib, re, sys, time, urllib.request

port = sys.argv[1]
for _ in range(200):  # wait for the server
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
        break
    except OSError:
        time.sleep(0.05)
for eml in sorted(pathlib.Path("outbox").glob("*.eml")):
    message = email.message_from_bytes(eml.read_bytes())
    if "katherine@" in message["To"]:
        link = re.search(r"<(https?://[^>]+)>", message["List-Unsubscribe"]).group(1)
        print(f"$ curl -X POST -d List-Unsubscribe=One-Click {link[:60]}...")
        request = urllib.request.Request(link, data=b"List-Unsubscribe=One-Click", method="POST")
        with urllib.request.urlopen(request, timeout=10) as answer:
            print(answer.status, answer.reason)
PY
step recipient show katherine@example.com
kill -TERM "$server"
wait "$server" || { echo "cm serve exited $?" >&2; exit 1; }
