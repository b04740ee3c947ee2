#!/usr/bin/env bash
# The recorded bench_serving run: start `stagewise serve` on dummy weights, wait for
# /health, run perf/bench_serving.py at each request rate, stop the server.
#
#   perf/serve_and_bench.sh MODEL_DIR OUTPUT_JSONL [RATES...]
#
# MODEL_DIR holds a config.json (e.g. Llama-3.1-8B-Instruct's) and any tokenizer
# (prompts are sent as token ids). Without tokenizer files there, the bundled demo
# model's are copied in (models/demo: tokenizer.json, tokenizer_config.json,
# special_tokens_map.json). Defaults: rates 4 16 inf, 500 prompts of
# 1024 input / 256 output tokens (NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN override),
# the serving placement (two processes).
set -euo pipefail
model_dir=$1
output=$2
shift 2
if [ $# -gt 0 ]; then rates=("$@"); else rates=(4 16 inf); fi
port=${PORT:-30000}
if [ ! -e "$model_dir/tokenizer.json" ] && [ ! -e "$model_dir/tokenizer.model" ]; then
    demo=$(dirname "$0")/../models/demo
    cp "$demo/tokenizer.json" "$demo/tokenizer_config.json" "$demo/special_tokens_map.json" "$model_dir/"
fi
python3 -m pipeline.cli serve --model-path "$model_dir" --load-format dummy --placement serving \
    --context-length 4096 --port "$port" --enable-metrics &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
python3 "$(dirname "$0")/wait_healthy.py" "$port" "$server" 600
for rate in "${rates[@]}"; do
    python3 perf/bench_serving.py --port "$port" --dataset-name random --random-input-len "${INPUT_LEN:-1024}" \
        --random-output-len "${OUTPUT_LEN:-256}" --random-range-ratio 1.0 --num-prompts "${NUM_PROMPTS:-500}" \
        --request-rate "$rate" --output-file "$output" \
        --tag "$(basename "$model_dir") dummy weights, --context-length 4096 --placement serving"
done
