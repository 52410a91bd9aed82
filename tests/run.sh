#!/usr/bin/env bash
# Run the test suite: creates ./.venv with everything it needs on first use (see scripts/env.sh).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
exec "$PYTHON" -m pytest -q -p no:cacheprovider "$@"  # no path: pyproject's testpaths (tests/)
