#!/usr/bin/env bash
# Run a command with a throwaway PostgreSQL server for the shadow log store's tests.
#
# Finds PostgreSQL's server binaries (installing the Debian package with apt-get when missing and
# allowed), creates a cluster in a temp folder, starts it on a free loopback port, exports
# CTLOOP_TEST_POSTGRES_URL, runs the command, and stops and deletes the cluster afterwards.
# Without a way to get PostgreSQL, it runs the command anyway (those tests then skip, with the
# reason) unless CTLOOP_REQUIRE_POSTGRES=1, as in .ci/run, where that is an error.
set -uo pipefail

require="${CTLOOP_REQUIRE_POSTGRES:-0}"
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi; }
find_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

give_up() {
  echo "with_postgres: $1" >&2
  if [ "$require" = 1 ]; then exit 1; fi
  echo "with_postgres: running without PostgreSQL; its tests will skip" >&2
  exec "$@"
}

bin="$(find_bin)"
if [ -z "$bin" ]; then
  echo "with_postgres: installing PostgreSQL with apt-get" >&2
  { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } \
    || give_up "PostgreSQL is not installed and apt-get could not install it (needs root or sudo)" "$@"
  bin="$(find_bin)"
  [ -n "$bin" ] || give_up "apt-get ran but no PostgreSQL server binaries were found" "$@"
fi

dir="$(mktemp -d /tmp/ctloop-pg.XXXXXX)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
run_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$dir"
cleanup() { run_pg "$bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1; rm -rf "$dir"; }
trap cleanup EXIT

run_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=trust >"$dir/initdb.log" 2>&1 \
  || { cat "$dir/initdb.log" >&2; give_up "initdb failed" "$@"; }
run_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off" start >/dev/null \
  || { cat "$dir/server.log" >&2; give_up "the PostgreSQL server did not start" "$@"; }
run_pg "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres ctloop_test || give_up "createdb failed" "$@"

export CTLOOP_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:$port/ctloop_test"
# For the outage test, which stops and restarts this server: pg_ctl, the data folder, the options.
export CTLOOP_TEST_POSTGRES_CTL="$bin/pg_ctl" CTLOOP_TEST_POSTGRES_DATA="$dir/data"
export CTLOOP_TEST_POSTGRES_OPTIONS="-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off"
echo "with_postgres: PostgreSQL $(basename "$(dirname "$bin")") on 127.0.0.1:$port" >&2
"$@"
