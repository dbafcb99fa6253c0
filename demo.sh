#!/usr/bin/env bash
# Starts a changeover server in a fresh product folder and connects two agents to it.
# Everything stops on Ctrl-C. Usage: ./demo.sh [PORT]
set -euo pipefail
cd "$(dirname "$0")"
port="${1:-7600}"

cargo build --release --quiet -p changeover-server -p changeover-agent
bin="$(pwd)/target/release"
demo="$(mktemp -d /tmp/changeover-demo.XXXXXX)"
export CHANGEOVER_ADMIN_PASSWORD="${CHANGEOVER_ADMIN_PASSWORD:-demo-password}"
pids=()
cleanup() {
    kill "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    echo "demo stopped; its files are in $demo"
}
trap cleanup EXIT INT TERM

echo "product folder: $demo/office"
"$bin/changeover-server" run --root "$demo/office" --listen "127.0.0.1:$port" \
    > "$demo/server.out" 2> "$demo/server.log" &
pids+=($!)
for _ in $(seq 50); do
    grep -q '^listening on' "$demo/server.out" 2>/dev/null && break
    sleep 0.1
done
grep '^listening on' "$demo/server.out" || { cat "$demo/server.log"; exit 1; }
url="ws://127.0.0.1:$port"

for user in alice bob; do
    "$bin/changeover-agent" run --server "$url" --user "$user" --state-dir "$demo/$user" \
        2> "$demo/$user.log" &
    pids+=($!)
done
sleep 1
"$bin/changeover-agent" admin status --server "$url"

cat <<HELP

The server and two agents are running (logs in $demo). Try, in another terminal:
  export CHANGEOVER_ADMIN_PASSWORD=$CHANGEOVER_ADMIN_PASSWORD
  $bin/changeover-agent run --server $url --user carol --state-dir $demo/carol
  $bin/changeover-agent admin status --server $url --json
Press Ctrl-C here to stop everything.
HELP
wait
