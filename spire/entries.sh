#!/bin/sh
# Registration entries for docker-compose.yml: run once at start by the spire-entries service.
#
# Creates every entry in entries.json (the SPIFFE IDs the policies name, plus authz-server's
# own) through the SPIRE server's local API socket. Idempotent: an entry that already exists
# (gRPC AlreadyExists, code 6, after a restart with the server's datastore kept) counts as
# done; any other failure makes the service, and every service waiting on it, fail.
set -eu

SOCKET="${SPIRE_SERVER_SOCKET:-/run/spire/server/private/api.sock}"
DATA="${1:-/etc/spire/entries.json}"
SPIRE_SERVER="${SPIRE_SERVER_BIN:-/opt/spire/bin/spire-server}"

waited=0
until "$SPIRE_SERVER" healthcheck -socketPath "$SOCKET" >/dev/null 2>&1; do
    waited=$((waited + 1))
    if [ "$waited" -ge 60 ]; then
        echo "spire-entries: SPIRE server not healthy after 60 s at $SOCKET" >&2
        exit 1
    fi
    sleep 1
done

out=$("$SPIRE_SERVER" entry create -socketPath "$SOCKET" -data "$DATA" -output json)
codes=$(printf '%s' "$out" | grep -o '"code": *[0-9]*' | sed 's/.*: *//')
if [ -z "$codes" ]; then
    echo "spire-entries: unexpected answer from 'entry create':" >&2
    printf '%s\n' "$out" >&2
    exit 1
fi
created=0
existing=0
for code in $codes; do
    case "$code" in
        0) created=$((created + 1)) ;;
        6) existing=$((existing + 1)) ;;
        *)
            echo "spire-entries: an entry was refused (gRPC code $code):" >&2
            printf '%s\n' "$out" >&2
            exit 1
            ;;
    esac
done
echo "spire-entries: $created created, $existing already present"
"$SPIRE_SERVER" entry show -socketPath "$SOCKET"
