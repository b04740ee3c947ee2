#!/usr/bin/env bash
# A/B two source trees on one GPU machine: the one-batch step times and the SGLang CI
# offline serving workload, each tree in turn, so both numbers come from the same device.
#
#   perf/ab_trees.sh BASELINE_TREE RESULTS_DIR [MODEL]
#
# BASELINE_TREE is another checkout of this project (e.g. `git archive <commit> | tar -x -C DIR`);
# this checkout is "new". MODEL is a bundled config name (default Llama-3.1-8B-Instruct), run
# on dummy weights. Order: one_batch base, one_batch new, serving base, serving new.
#   one_batch: perf/bench_one_batch.py --batch-sizes 1,64 --input-lens 256 (each tree's own script)
#   serving:   `stagewise serve --placement serving --load-format dummy --context-length 8192`
#              from each tree, driven by this checkout's perf/bench_serving.py with
#              --dataset-name random --random-input-len 4096 --random-output-len 2048
#              --random-range-ratio 0 --num-prompts 500 --request-rate inf (NUM_PROMPTS overrides)
# Results: RESULTS_DIR/one_batch-{base,new}/*.json, RESULTS_DIR/serving.jsonl (tag base|new),
# RESULTS_DIR/*.log; RESULTS_DIR/done is written last. ONLY=one_batch|serving runs one half.
set -uo pipefail
base=$(cd "$1" && pwd)
results=$2
model=${3:-Llama-3.1-8B-Instruct}
new=$(cd "$(dirname "$0")/.." && pwd)
port=${PORT:-30123}
mkdir -p "$results"

model_dir=$results/model-$model
mkdir -p "$model_dir"
cp "$new/tests/models/configs/$model.json" "$model_dir/config.json"
cp "$new/models/demo/tokenizer.json" "$new/models/demo/tokenizer_config.json" \
   "$new/models/demo/special_tokens_map.json" "$model_dir/"

one_batch() {  # tree name
    (cd "$1" && OUT="$results/one_batch-$2" PYTHONPATH="$1" python3 perf/bench_one_batch.py --models "$model" \
        --batch-sizes 1,64 --input-lens 256) > "$results/one_batch-$2.log" 2>&1
}

serving() {  # tree name
    (cd "$1" && PYTHONPATH="$1" exec python3 -m pipeline.cli serve --model-path "$model_dir" --load-format dummy \
        --placement serving --context-length 8192 --port "$port" --enable-metrics) > "$results/server-$2.log" 2>&1 &
    local server=$!
    for _ in $(seq 600); do
        python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health', timeout=2)" \
            2> /dev/null && break
        kill -0 $server 2>/dev/null || { echo "server $2 exited" >> "$results/serving-$2.log"; return 1; }
        sleep 1
    done
    PYTHONPATH="$new" python3 "$new/perf/bench_serving.py" --port "$port" --dataset-name random \
        --random-input-len 4096 --random-output-len 2048 --random-range-ratio 0 \
        --num-prompts "${NUM_PROMPTS:-500}" --request-rate inf --output-file "$results/serving.jsonl" \
        --tag "$2: $model dummy weights, --context-length 8192 --placement serving" > "$results/serving-$2.log" 2>&1
    kill -TERM $server
    wait $server
}

mkdir -p "$results/one_batch-base" "$results/one_batch-new"
if [ "${ONLY:-all}" != serving ]; then one_batch "$base" base; one_batch "$new" new; fi
if [ "${ONLY:-all}" != one_batch ]; then serving "$base" base; serving "$new" new; fi
date > "$results/done"
