#!/usr/bin/env bash
# The serving tests against the newest transformers and peft on the package index.
#
# pyproject.toml pins the ranges the serving fast paths (the routed LoRA forward, the lean decoding
# step) were tested on. This finds the newest releases; when they are no newer than the ones
# installed in .venv (the main test run used those) it says so and stops. Otherwise it builds
# build/newest-venv with them, runs the serving tests there, and reports what broke. A failure is
# reported, and exits non-zero only with CTLOOP_NEWEST_STRICT=1: a new upstream release should warn,
# not block every change of this project until the pins move.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
TESTS="tests/test_streaming.py tests/test_lean_decode.py tests/test_fused_lora.py tests/test_openai_surface.py tests/test_chat_template.py"
strict="${CTLOOP_NEWEST_STRICT:-0}"
fail() { echo "newest_releases: $1" >&2; [ "$strict" = 1 ] && exit 1; exit 0; }

newest() { "$PY" -m pip index versions "$1" 2>/dev/null | head -n 1 | sed -E 's/.*\((.*)\).*/\1/'; }
installed() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
newer() { "$PY" -c "import sys; from packaging.version import Version as V; sys.exit(0 if V('$1') > V('$2') else 1)"; }

transformers="$(newest transformers)" peft="$(newest peft)"
[ -n "$transformers" ] && [ -n "$peft" ] || fail "the package index did not answer; nothing checked"
if ! newer "$transformers" "$(installed transformers)" && ! newer "$peft" "$(installed peft)"; then
  echo "newest_releases: transformers $transformers and peft $peft, the newest on the index, are no newer than the ones the test run used"
  exit 0
fi
echo "newest_releases: testing the serving path with transformers $transformers and peft $peft" >&2
venv=build/newest-venv
rm -rf "$venv"
python3 -m venv "$venv" || fail "could not create $venv"
"$venv/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" || fail "could not install torch in $venv"
"$venv/bin/python" -m pip install -q -e ".[test]" || fail "could not install ctloop in $venv"
"$venv/bin/python" -m pip install -q "transformers==$transformers" "peft==$peft" \
  || fail "could not install transformers $transformers and peft $peft in $venv"
got="$("$venv/bin/python" -c "import transformers, peft; print(transformers.__version__, peft.__version__)")"
[ "$got" = "$transformers $peft" ] || fail "$venv has transformers and peft $got, not $transformers $peft"
# shellcheck disable=SC2086
if "$venv/bin/python" -m pytest -q -p no:cacheprovider $TESTS; then
  echo "newest_releases: the serving tests pass with transformers $transformers and peft $peft; the pins may move"
  exit 0
fi
fail "the serving tests FAIL with transformers $transformers and peft $peft (above); keep the pins"
