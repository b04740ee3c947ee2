#!/usr/bin/env bash
# Prefill/decode disaggregation on one GPU beside the non-disaggregated server, in one call:
# the SGLang CI workload (random 4096 in / 2048 out, range ratio 0, 500 prompts, rate inf)
# against `--placement serving`, then against `--placement pd` (one prefill and one decode
# engine, separate processes, both on cuda:0), then the KV transfer bandwidth from /metrics.
#
#   perf/bench_pd.sh MODEL_DIR [OUTPUT_JSONL]
#
# MODEL_DIR holds a config.json (e.g. Llama-3.1-8B-Instruct's; weights are dummy) and any
# tokenizer (the bundled demo model's is copied in when there is none). OUTPUT_JSONL
# defaults to $OUT/bench_pd.jsonl (or perf/results/bench_pd.jsonl without $OUT); every line
# is also appended to perf/results/bench_pd-<model>-<gpu>.jsonl. bench_serving.py writes
# one line per run (TTFT, ITL, throughput); the last line is the transfer summary:
# {"kind": "pd_transfer", "bytes", "seconds", "transfers", "gbps", "transport"} from the
# decode engine's stagewise:pd_transfer_{bytes,seconds}_total (seconds: summed per
# transfer, start to end, so gbps is the mean bandwidth of one transfer).
# NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN, CONTEXT_LEN, PORT and MEM_FRACTION override the
# defaults (500, 4096, 2048, 8192, 30000, 0.4: both engines share the GPU, so each takes
# 0.4 of the memory free after its weights); TRANSFER_BACKEND (auto: CUDA IPC on one host;
# torch: NCCL) picks the KV transport.
set -euo pipefail
model_dir=$1
out_dir=${OUT:-perf/results}
output=${2:-$out_dir/bench_pd.jsonl}
port=${PORT:-30000}
num_prompts=${NUM_PROMPTS:-500}
input_len=${INPUT_LEN:-4096}
output_len=${OUTPUT_LEN:-2048}
context_len=${CONTEXT_LEN:-8192}
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).lower().replace(' ', '-'))")
record=perf/results/bench_pd-$(basename "$model_dir")-$gpu.jsonl
if [ ! -e "$model_dir/tokenizer.json" ] && [ ! -e "$model_dir/tokenizer.model" ]; then
    demo=$(dirname "$0")/../models/demo
    cp "$demo/tokenizer.json" "$demo/tokenizer_config.json" "$demo/special_tokens_map.json" "$model_dir/"
fi
mkdir -p "$(dirname "$output")"

server=""
stop_server() {
    if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
    server=""
}
trap stop_server EXIT

wait_healthy() {
    python3 "$(dirname "$0")/wait_healthy.py" "$port" "$server" 900
}

run() {  # run PLACEMENT_FLAGS...: start the server, run the workload, leave it running
    local tag="$(basename "$model_dir") dummy weights, --context-length $context_len $*"
    python3 -m pipeline.cli serve --model-path "$model_dir" --load-format dummy --context-length "$context_len" \
        --port "$port" --enable-metrics "$@" &
    server=$!
    wait_healthy
    python3 perf/bench_serving.py --port "$port" --dataset-name random --random-input-len "$input_len" \
        --random-output-len "$output_len" --random-range-ratio 0 --num-prompts "$num_prompts" \
        --request-rate inf --output-file "$output" --tag "$tag ($gpu)"
}

run --placement serving
stop_server
run --placement pd --pd-prefill 1 --pd-decode 1 --mem-fraction-static "${MEM_FRACTION:-0.4}" \
    --disaggregation-transfer-backend "${TRANSFER_BACKEND:-auto}"
sleep 2  # each engine publishes its stats once a second
python3 - "$port" "$output" "$gpu" <<'PY'
import json, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families

text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=30).read().decode()
values, transport = {}, ""
for family in text_string_to_metric_families(text):
    for sample in family.samples:
        if sample.labels.get("role") != "decode":
            continue
        if sample.name == "stagewise:pd_transport_info":
            transport = sample.labels["transport"]
        elif sample.name in ("stagewise:pd_transfer_bytes_total", "stagewise:pd_transfer_seconds_total",
                             "stagewise:pd_transfers_total"):
            values[sample.name.removeprefix("stagewise:pd_").removesuffix("_total")] = sample.value
seconds = values.get("transfer_seconds", 0.0)
line = {"kind": "pd_transfer", "device": sys.argv[3], "transport": transport,
        "transfers": int(values.get("transfers", 0)), "bytes": int(values.get("transfer_bytes", 0)),
        "seconds": seconds, "gbps": values.get("transfer_bytes", 0) / seconds / 1e9 if seconds else 0.0}
print(json.dumps(line))
with open(sys.argv[2], "a") as out:
    out.write(json.dumps(line) + "\n")
PY
stop_server
if [ "$(realpath "$output")" != "$(realpath -m "$record")" ]; then cat "$output" >> "$record"; fi
