#!/usr/bin/env bash
# Set everything up (see tools/_setup.sh) and optimize the bundled default model
# (tiny LLaVA-OneVision trained on vopt's synthetic video task): prints the
# before/after report and the validation, then the held-out task accuracy of the
# original and the optimized model (vopt.eval.compare).
# Extra arguments go to `vopt-compile build` (e.g. --passes sdpa --json).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
cd "$ROOT"
MODEL="$("$VPY" -c 'import vopt.zoo; print(vopt.zoo.DEFAULT_MODEL)')"
echo "vopt: vopt-compile build $MODEL $*"
vopt-compile build "$MODEL" "$@"
echo
echo "vopt: task accuracy, original vs optimized (tools/eval_video_qa.py --passes default)"
exec "$VPY" tools/eval_video_qa.py --passes default
