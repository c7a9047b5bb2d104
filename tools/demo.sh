#!/usr/bin/env bash
# Set everything up (see tools/_setup.sh) and optimize the bundled default model
# (tiny LLaVA-OneVision): prints the before/after report and the validation.
# Extra arguments go to `vopt-compile build` (e.g. --passes sdpa --json).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
cd "$ROOT"
MODEL="$("$VPY" -c 'import vopt.zoo; print(vopt.zoo.DEFAULT_MODEL)')"
echo "vopt: vopt-compile build $MODEL $*"
exec vopt-compile build "$MODEL" "$@"
