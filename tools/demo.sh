#!/usr/bin/env bash
# Set everything up (see tools/_setup.sh) and optimize the bundled default model
# (tiny LLaVA-OneVision trained on vopt's synthetic video task): prints the
# before/after report and the validation (default, exact passes), then the
# held-out task accuracy of the original vs the SageAttention2-quantized model
# (vopt.eval.compare on 400 test clips).
# Extra arguments go to `vopt-compile build` (e.g. --passes sdpa --json).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
cd "$ROOT"
MODEL="$("$VPY" -c 'import vopt.zoo; print(vopt.zoo.DEFAULT_MODEL)')"
echo "vopt: vopt-compile build $MODEL $*"
vopt-compile build "$MODEL" "$@"
echo
echo "vopt: task accuracy, original vs quantized attention (tools/eval_video_qa.py --passes canonicalize_attention,sageattention2)"
exec "$VPY" tools/eval_video_qa.py --passes canonicalize_attention,sageattention2
