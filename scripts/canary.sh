#!/usr/bin/env bash
# Drift canary: the fast tests on the newest releases that pyproject.toml allows, in a throw-away venv,
# and every package that differs from requirements.lock.txt. This is how a maintainer learns that a new
# release (transformers 5.24's renamed cache keyword, say) breaks or changes something before a user
# does. It is not part of .ci/run, which installs the lock.
#
#   bash scripts/canary.sh                 # everything at its newest allowed release, torch included
#   bash scripts/canary.sh --hold torch    # keep some packages at the lock's version (torch: no CUDA build)
#
# Leaves nothing behind; exits non-zero when the tests fail (drift alone is reported, not an error).
# The fast tests are those of `python -m pytest`, less the slow ones (the real DAG, the embedded model),
# the SLURM cluster and the test that the environment is the lock (here it is not, on purpose).
set -euo pipefail
cd "$(dirname "$0")/.."

held=()
while (($#)); do
    case "$1" in
        --hold) held+=("$2"); shift 2 ;;
        *) echo "canary.sh: unknown argument '$1' (allowed: --hold PACKAGE)" >&2; exit 2 ;;
    esac
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
: > "$work/hold.txt"
for name in "${held[@]}"; do  # the lock's pin of each held package becomes a pip constraint
    grep -i -E "^${name}==" requirements.lock.txt >> "$work/hold.txt" \
        || { echo "canary.sh: --hold $name: not in requirements.lock.txt" >&2; exit 2; }
done

echo "canary: a new venv with the newest releases allowed by pyproject.toml${held:+ (held at the lock: ${held[*]})}"
python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
pip install -qq -c "$work/hold.txt" -e '.[test]'  # a fresh venv: pip takes the newest release each bound allows

echo
python -m cqil.tracking.environment requirements.lock.txt || true  # the drift: reported, not a failure
echo
python -m pytest -q -p no:cacheprovider -m "not slow and not slurm and not lock"
