#!/usr/bin/env bash
# Set everything up (see tools/_setup.sh) and run the test suite.
# Tests marked `gpu` skip cleanly without a CUDA GPU. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
cd "$ROOT"
exec "$VPY" -m pytest -q -p no:cacheprovider tests "$@"
