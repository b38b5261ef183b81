#!/bin/bash
# The GPU tables of BENCHMARKS.md, one process per benchmark (ours, then the naive diffusers loop on the same card),
# each with a time limit so that one failure or hang does not cost the rest:
#
#     OUT=results bash scripts/benchmark_suite.sh sdxl sd35 flux methods        # groups in this order
#     PROMPTS=offline OUT=results bash scripts/benchmark_suite.sh flux          # a machine without the hub's prompts
#
# Groups: sdxl (batch 1, eager, beside naive_sdxl.py), sdxl4 (batch 4), sdxlc and sdxlc4 (batch 1 and 4 compiled:
# block by block, the SDXL configs' compile_scope, beside naive_sdxl.py; one H200 call each), sdxlcm (batch 1
# compiled whole), sd35c and fluxc (SD3.5 medium and FLUX.1-dev, batch 1, compiled block by block), sd35, sd354, flux,
# flux4 (the same for SD3.5 medium and FLUX.1-dev, beside benchmark_naive.py), sd35knobs (SD3.5 medium with each
# knob of the low-memory plan off in turn), methods (SD 1.5 size), methods35 (SD3.5 medium), underflow (fp16's zero
# LoRA-B gradients at K=1 and 3, SD 1.5 size, and K=1 in bf16 and fp32 beside them); at SD 1.5 size, batch 4, compiled (each compiles for ~280 s on an
# H200, so one or two per call): plan15 (the memory-budget plan at the peer's 15 GiB, K=1 and 50), planoff (the
# low-memory plan, the same rows), warm (a cold run that saves the compile cache, then a warm one from the file
# alone, a fresh inductor cache dir), ddp (K=50 through a one-process DDP, the DDPOptimizer off as now and on as
# before), blocks (the low-memory plan compiled block by block, K=1 and 50), b64 and fp8 (images/s at K=1, batch 64:
# exact, and with the float8 prefix and how far it moves the images and rewards). Each benchmark writes
# OUT/bench_NAME.json and OUT/NAME.log; OUT/progress lists them with their exit codes (124: its time limit).
set -u
OUT=${OUT:-.}; mkdir -p "$OUT"
P=""
[ "${PROMPTS:-}" = offline ] && P="--config.prompt_fn=simple_animals --config.eval_prompt_fn=eval_simple_animals"
E="--config.speed.compile=False"
XL="--config config/align_prop.py:aesthetic_sdxl $P"
S3="--config config/align_prop.py:hps_sd35 --steps 28 --config.reward.hps.path=random $P"
FX="--config config/align_prop.py:hps_flux --steps 28 --config.reward.hps.path=random $P"
M="--methods alignprop,draft_lv,refl,drtune,alignprop+kl"

run() {  # NAME SECONDS SCRIPT ARGS...
    local name=$1 limit=$2; shift 2
    echo "$name start $(date +%T)" >> "$OUT/progress"
    PYTHONUNBUFFERED=1 timeout "$limit" python3 "$@" --out "$OUT" --label "$name" > "$OUT/$name.log" 2>&1
    echo "$name rc=$? end $(date +%T)" >> "$OUT/progress"
}

for group in "$@"; do
    case $group in
        sdxl) run sdxl_b1_eager 300 scripts/benchmark.py $XL --batch 1 --ks 1,10 --iters 2 $E
              run sdxl_b1_naive 300 scripts/naive_sdxl.py $XL --batch 1 --ks 1,10 --iters 2 ;;
        sdxl4) run sdxl_b4_eager 400 scripts/benchmark.py $XL --batch 4 --ks 1,10 --iters 1 $E
               run sdxl_b4_naive 400 scripts/naive_sdxl.py $XL --batch 4 --ks 1,10 --iters 1 ;;
        sdxlc) run sdxl_b1_compiled 370 scripts/benchmark.py $XL --batch 1 --ks 1,10 --iters 2
               run sdxl_b1_naive 200 scripts/naive_sdxl.py $XL --batch 1 --ks 1,10 --iters 2 ;;
        sd35) run sd35_b1_eager 300 scripts/benchmark.py $S3 --batch 1 --ks 1,4 --iters 2 $E
              run sd35_b1_naive 300 scripts/benchmark_naive.py $S3 --batch 1 --ks 1,4 --iters 2 ;;
        sd35knobs) run sd35_b1_last_step_kept 300 scripts/benchmark.py $S3 --batch 1 --ks 1 --iters 2 $E \
                       --config.speed.uncheckpointed_steps=1
                   run sd35_b1_vae_blocks_kept 300 scripts/benchmark.py $S3 --batch 1 --ks 1 --iters 2 $E \
                       --config.speed.checkpoint_vae_blocks=False ;;
        sd354) run sd35_b4_eager 300 scripts/benchmark.py $S3 --batch 4 --ks 1,4 --iters 1 $E
               run sd35_b4_naive 300 scripts/benchmark_naive.py $S3 --batch 4 --ks 1,4 --iters 1 ;;
        flux) run flux_b1_eager 360 scripts/benchmark.py $FX --batch 1 --ks 1,4 --iters 2 $E
              run flux_b1_naive 360 scripts/benchmark_naive.py $FX --batch 1 --ks 1,4 --iters 2 ;;
        flux4) run flux_b4_eager 480 scripts/benchmark.py $FX --batch 4 --ks 1,4 --iters 1 $E
               run flux_b4_naive 480 scripts/benchmark_naive.py $FX --batch 4 --ks 1,4 --iters 1 ;;
        methods) run methods_sd15 300 scripts/benchmark.py --batch 4 --ks 1 --iters 3 $M $E ;;
        methods35) run methods_sd35 400 scripts/benchmark.py $S3 --batch 1 --ks 1 --iters 2 $M $E ;;
        underflow) run underflow_k1 200 scripts/benchmark.py --batch 4 --ks 1 --iters 0 --underflow 1 $E
                   run underflow_k3 200 scripts/benchmark.py --batch 4 --ks 1 --iters 0 --underflow 3 $E
                   run underflow_k1_bf16 200 scripts/benchmark.py --batch 4 --ks 1 --iters 0 --underflow 1 $E --precision bf16
                   run underflow_k1_fp32 200 scripts/benchmark.py --batch 4 --ks 1 --iters 0 --underflow 1 $E --precision no ;;
        plan15) run plan15 420 scripts/benchmark.py --batch 4 --ks 1,50 --iters 2 $P --config.speed.memory_budget_gib=15 ;;
        planoff) run planoff 420 scripts/benchmark.py --batch 4 --ks 1,50 --iters 2 $P --config.speed.memory_budget_gib=off ;;
        warm) C=$(mktemp -d)
              TORCHINDUCTOR_CACHE_DIR=$C/cold run warm_cold 400 scripts/benchmark.py --batch 4 --ks 1 --iters 1 $P \
                  --compile-cache $C/cache.bin
              TORCHINDUCTOR_CACHE_DIR=$C/warm run warm_warm 200 scripts/benchmark.py --batch 4 --ks 1 --iters 1 $P \
                  --compile-cache $C/cache.bin ;;
        blocks) run blocks 420 scripts/benchmark.py --batch 4 --ks 1,50 --iters 2 $P --config.speed.compile_scope=blocks ;;
        sd35c) run sd35_b1_compiled_blocks 560 scripts/benchmark.py $S3 --batch 1 --ks 1,4 --iters 2 \
                   --config.speed.compile_scope=blocks ;;
        fluxc) run flux_b1_compiled_blocks 560 scripts/benchmark.py $FX --batch 1 --ks 1,4 --iters 2 \
                   --config.speed.compile_scope=blocks ;;
        sdxlc4) run sdxl_b4_compiled 400 scripts/benchmark.py $XL --batch 4 --ks 1,10 --iters 1
                run sdxl_b4_naive 170 scripts/naive_sdxl.py $XL --batch 4 --ks 1,10 --iters 1 ;;
        sdxlcm) run sdxl_b1_compiled_model 560 scripts/benchmark.py $XL --batch 1 --ks 1,10 --iters 2 \
                    --config.speed.compile_scope=model ;;
        b64) run b64 450 scripts/benchmark.py --batch 64 --ks 1 --iters 2 $P ;;
        fp8) run fp8_b64 450 scripts/benchmark.py --batch 64 --ks 1 --iters 2 $P --config.speed.fp8_prefix=True \
                 --fp8-drift 1 ;;
        ddp) run ddp_after 420 scripts/benchmark.py --batch 4 --ks 50 --iters 2 $P --ddp
             run ddp_before 420 scripts/benchmark.py --batch 4 --ks 50 --iters 2 $P --ddp --ddp-optimizer ;;
        *) echo "unknown group '$group': sdxl sdxl4 sdxlc sd35 sd35knobs sd354 flux flux4 methods methods35 underflow" \
                "plan15 planoff warm ddp blocks b64 fp8 sdxlc4 sdxlcm sd35c fluxc" >&2; exit 2 ;;
    esac
done
