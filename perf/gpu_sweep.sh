#!/usr/bin/env bash
# The GPU checks and figures the open work still owes, one section per device call (each
# fits in ten minutes on an H100). Output: one log per step under $OUT (or perf/results),
# and each script's own JSON in perf/results/ and $OUT.
#
#   perf/gpu_sweep.sh SECTION [SECTION...]
#
#   kernels  compile and test, on the GPU, every kernel not yet run on one: quantized GEMMs
#            (split-K decode tiles), FP8 KV cache, MoE decode path, vision tower (layer_norm,
#            gelu, pos_embed, scatter_rows, vision attention), tree attention and draft trees,
#            token ranks
#   graphs   the speculative verify and draft-step CUDA graphs
#   suite    the engine, model-parity and bad-input tests that run on a GPU
#   quant    bench_kernels quant + kv_fp8 (incl. the decode tile candidates), batch-1 decode
#            of Llama-3.1-8B as bf16 / online fp8 / AWQ / fp8-block + FP8 KV
#   quant-decode  batch-1 decode of the four variants, the kernel audit of AWQ at batch 1
#   quant-gemv  the same figures, bench_kernels quant (GEMV and TMA tiles), the quantized GEMM tests
#   quant-triage  bench_kernels quant + kv_fp8, the kernel audit (per-kernel times) of AWQ + FP8 KV
#            and online FP8 at batch 1
#   moe      Qwen3-30B-A3B batch-1 decode vs its active-weight roofline, bench_kernels moe
#   audit    the kernel audit (0 kernels not from triton_kernels/) of quantized models with
#            the FP8 KV cache, of the MoE model and of a VL prefill with images
#   spec     perf/bench_speculative.py (verify cost, oracle speedup curve, EAGLE3 step)
#   vl       vision kernels vs torch SDPA and the torch ops, perf/bench_vl.py
#   decode   profile_decode.py on Llama-3.1-8B and Mistral-7B (where the batch-1 step goes)
#
# The device image lacks msgspec, outlines-core, openai, jsonschema and pillow: carry
# .device-wheels (../shared/tools/device-wheels.sh makes it). PD serving runs are
# perf/bench_pd.sh (two 500-prompt runs: more than one call).
set -u
export PYTHONPATH=$PWD
out=${OUT:-perf/results}
python3 -m pip install -q --no-index --find-links .device-wheels msgspec outlines-core openai jsonschema pillow \
    2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
start=$(date +%s)

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.txt, one summary line
    local name=$1 limit=$2 t0
    shift 2
    t0=$(date +%s)
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    echo "$name rc=$? $(( $(date +%s) - t0 ))s (at $(( $(date +%s) - start ))s): $(tail -1 "$out/$name.txt")"
}

for section in "$@"; do
    case $section in
    kernels)
        # Triton's compiler is CPU-bound: one pytest per test file, all at once (16 cores).
        mkdir -p /tmp/kernel-tests
        for t in quant_w8a8 quant_w4a16 quant_kv_fp8 quant_moe moe norm activation pos_embed scatter \
                 vision_attention tree_attention draft_tree sampling; do
            timeout ${KERNEL_TEST_S:-240} python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/kernels/test_$t.py \
                > /tmp/kernel-tests/$t.txt 2>&1 &
        done
        wait
        for f in /tmp/kernel-tests/*.txt; do echo "== $(basename $f .txt): $(tail -1 $f)"; done \
            | tee "$out/kernel-tests.txt"
        cat /tmp/kernel-tests/*.txt >> "$out/kernel-tests.txt" ;;
    graphs)
        step spec-graphs 200 python3 -m pytest -q -p no:cacheprovider tests/engine/test_speculative_graphs.py \
            tests/engine/test_speculative_eagle.py -k "not server" ;;
    suite)
        step gpu-suite 400 python3 -m pytest -q -p no:cacheprovider tests/engine/test_gpu.py \
            tests/models/test_gpu_parity.py tests/server/test_bad_input_fuzz.py ;;
    quant)
        step bench-quant 200 python3 perf/bench_kernels.py --only quant,kv_fp8 --quick --rounds 1
        step one-batch-quant 280 python3 perf/bench_one_batch.py --models Llama-3.1-8B-Instruct \
            --variants bf16,fp8,awq,fp8-block+kv-fp8 --batch-sizes 1,16 --input-lens 256 --decode-steps 16 ;;
    quant-decode)  # the batch-1 figures alone, and where AWQ's step goes
        step one-batch-quant "${ONE_BATCH_S:-150}" python3 perf/bench_one_batch.py --models Llama-3.1-8B-Instruct \
            --variants bf16,fp8,fp8-block+kv-fp8,awq --batch-sizes 1 --input-lens 256 --decode-steps 16
        step audit-awq "${AUDIT_S:-80}" python3 perf/kernel_audit.py --model Llama-3.1-8B-Instruct --variant awq --batch 1 ;;
    quant-gemv)  # the batch-1 figures with the GEMV decode kernels, the tile candidates, their GPU tests
        step one-batch-quant "${ONE_BATCH_S:-150}" python3 perf/bench_one_batch.py --models Llama-3.1-8B-Instruct \
            --variants bf16,fp8,fp8-block+kv-fp8,awq --batch-sizes 1 --input-lens 256 --decode-steps 16
        step bench-quant 170 python3 perf/bench_kernels.py --only kv_fp8,quant --quick --rounds 1
        for t in quant_w8a8 quant_w4a16 quant_kv_fp8; do
            timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short -rf tests/kernels/test_$t.py \
                > "$out/test-$t.txt" 2>&1 &
        done
        wait
        for t in quant_w8a8 quant_w4a16 quant_kv_fp8; do echo "== $t: $(tail -1 "$out/test-$t.txt")"; done
        step audit-awq "${AUDIT_S:-80}" python3 perf/kernel_audit.py --model Llama-3.1-8B-Instruct --variant awq --batch 1 ;;
    quant-triage)  # where the quantized decode step's time goes: kernel candidates, per-kernel times
        step bench-quant 150 python3 perf/bench_kernels.py --only quant,kv_fp8 --quick --rounds 1
        step audit-awq 100 python3 perf/kernel_audit.py --model Llama-3.1-8B-Instruct --variant awq+kv-fp8 --batch 1
        step audit-fp8 100 python3 perf/kernel_audit.py --model Llama-3.1-8B-Instruct --variant fp8 --batch 1 ;;
    audit)
        step audit-quant 120 python3 perf/kernel_audit.py --model Llama-3.1-8B-Instruct --variant awq+kv-fp8 --batch 2
        step audit-fp8 120 python3 perf/kernel_audit.py --model Llama-3.1-8B-Instruct --variant fp8-block --batch 2
        step audit-moe 150 python3 perf/kernel_audit.py --model Qwen3-30B-A3B
        step audit-vl 150 python3 perf/kernel_audit.py --model Qwen2.5-VL-7B-Instruct --image 1024x768 \
            --batch 2 --input-len 128 ;;
    moe)
        step one-batch-moe 150 python3 perf/bench_one_batch.py --models Qwen3-30B-A3B --batch-sizes 1,16 \
            --input-lens 256 --decode-steps 16
        step bench-moe 100 python3 perf/bench_kernels.py --only moe --quick ;;
    spec)
        step spec 500 python3 perf/bench_speculative.py ;;
    vl)
        step bench-vision 80 python3 perf/bench_kernels.py --only vision_tower,vision_attention --quick
        step bench-vl 300 python3 perf/bench_vl.py ;;
    decode)
        step profile-llama 200 python3 perf/profile_decode.py --model Llama-3.1-8B-Instruct
        step profile-mistral 200 python3 perf/profile_decode.py --model Mistral-7B-Instruct-v0.3 ;;
    *)
        echo "unknown section $section (kernels graphs suite quant quant-decode quant-gemv quant-triage moe audit spec vl decode)"; exit 2 ;;
    esac
done
