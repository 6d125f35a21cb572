#!/usr/bin/env bash
# The test suite in two parts: every test not marked serial on CTLOOP_TEST_WORKERS pytest-xdist
# workers (default 2; --dist loadfile keeps a file's tests, and its module fixtures, on one
# worker), then the serial ones alone (they stop the shared PostgreSQL server).
#
#     scripts/run_tests.sh PYTHON [pytest arguments...]      (make test runs it)
#
# Exit status: the first failing part's. Pytest's 5 (no test collected) is an error only when
# neither part ran a test, so CI still fails on an empty suite and `-k` may pick from one part.
# Arguments with their own marker selection (-m) run as given, in one process, one test at a time.
set -uo pipefail
py="$1"
shift
for argument in "$@"; do
  case "$argument" in -m | -m*) exec "$py" -m pytest "$@" ;; esac
done
"$py" -m pytest -n "${CTLOOP_TEST_WORKERS:-2}" --dist loadfile -m "not serial" "$@"
parallel=$?
"$py" -m pytest -m serial "$@"
serial=$?
if [ "$parallel" = 5 ] && [ "$serial" = 5 ]; then exit 5; fi
for status in "$parallel" "$serial"; do
  if [ "$status" != 0 ] && [ "$status" != 5 ]; then exit "$status"; fi
done
exit 0
