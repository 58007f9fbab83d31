#!/usr/bin/env bash
# GPU round 2 (issues 20 and 21.6) in ONE device call, run from the repo root:
#   bash benchmarks/gpu_round2.sh          (device `run`, carry [".whl", ".gl"], timeout_s 600)
# Steps, each under its own `timeout` so the whole stays near 540 s; logs under $OUT (8 files max):
#   e) lesson notebooks (solutions/, labs/) under nbval on the GPU          -> nbval.log
#   f) engine + kernel tests on the GPU                                     -> tests.log
#   h) exp_decode_order.py: the decode kernel in batch order vs longest first (S_DORDER, off by default) -> throughput.log
#   i) exp_decode_balance.py: the decode kernel's balanced splits (S_BAL, off by default) -> throughput.log
#   j) exp_decode_gemm.py: projection GEMMs at decode batches, cuBLAS vs Triton (S_GEMM, off; GM_ARGS) -> throughput.log
#   k) exp_sample_splits.py: the sampling kernel's split rows (S_SAMP, off) -> throughput.log
#   l) profile_decode.py --prefill: a prefill step's and decode steps' kernels (S_PPROF, off; PP_ARGS) -> throughput.log
#   m) exp_pdl.py: programmatic dependent launch per kernel boundary in a graph (S_PDL, off) -> throughput.log
#   n) exp_overlap.py: a decode step as two half batches on two streams (S_OVL, off; OVL_ARGS) -> throughput.log
#   a) throughput.py: engine defaults vs hand-tuned, same run, % of roofline -> throughput.log
#   g) issue 21.6: the commits before/after tensor parallelism, A/B alternating -> throughput.log (appended)
#      (the trees of 7e24f9f and d07ea77, prepared here as .gl/old and .gl/tp: see benchmarks/GPU_ROUND2.md)
#   b) exp_prefill.py: prefill kernel vs SDPA (4x2048, 1x16384) and 16k TTFT vs transformers -> prefill.log
#   d) bench_prefix_chunked.py (prefix caching + chunked prefill), if present -> prefix.log
#   c) bench_serving.py: labengine.serve under Poisson arrivals at rising rates -> serving.log, serving.png
# A summary table is printed last (and saved as summary.txt). Set DRY=1 to run everything at toy
# sizes on a CPU machine (checks the script, not the GPU). Knobs (environment): S_<STEP> seconds
# (0 skips), T_ARGS/G_TESTS (step f's pytest arguments / test files), A_CONFIGS/A_ARGS (step a's
# --configs / extra arguments), P_ARGS (step b's), SV_ARGS (step c's), AB_ROUNDS/AB_REPEATS
# (step g's), DEADLINE, NB_LAST.
set -u
ROOT=$(pwd)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
DRY=${DRY:-0}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
if [ "$DRY" = 0 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUT/pip.txt" 2>&1 || { cat "$OUT/pip.txt"; echo "wheel install failed"; }
  rm -f "$OUT/pip.txt"
  export PYTHONPATH=/tmp/site:$ROOT
  nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,driver_version --format=csv,noheader
else
  export PYTHONPATH=$ROOT
fi
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
# pytest-xdist (in the GPU image): notebooks and test files in parallel worker processes
NB_PAR=""; T_PAR=""
if $PY -c "import xdist" 2>/dev/null; then NB_PAR="-n NBW --dist loadscope"; T_PAR="-n TW --dist loadfile"; fi
declare -a SUMMARY
note() { SUMMARY+=("$1"); }
elapsed() { echo $(( $(date +%s) - T0 )); }
# run_step NAME SECONDS LOG CMD...: the step's exit status and seconds go into the summary
# (never past DEADLINE seconds from the start: a step gets what is left, or is skipped)
run_step() {
  local name=$1 secs=$2 log=$3; shift 3
  local t=$(date +%s) left=$(( DEADLINE - $(elapsed) - 3 ))
  [ "$left" -lt "$secs" ] && secs=$left
  if [ "$secs" -lt 10 ]; then note "$name | SKIPPED: out of time"; LAST_RC=125; return; fi
  echo; echo "=== $name (timeout ${secs}s, at $(elapsed)s) ===" | tee -a "$OUT/$log"
  timeout -k 5 "$secs" "$@" >>"$OUT/$log" 2>&1
  local rc=$?
  local what="rc=$rc"; [ $rc = 124 ] || [ $rc = 137 ] && what="TIMEOUT"
  echo "=== $name: $what after $(( $(date +%s) - t ))s ===" | tee -a "$OUT/$log"
  LAST_RC=$rc
  note "$name | $what | $(( $(date +%s) - t ))s"
}
if [ "$DRY" = 0 ]; then
  S_NB=${S_NB:-110} S_TESTS=${S_TESTS:-80} S_TP=${S_TP:-85} S_OLD=${S_OLD:-50} S_TTFT=${S_TTFT:-50}
  S_PREFILL=${S_PREFILL:-40} S_PREFIX=${S_PREFIX:-50} S_SERVE=${S_SERVE:-60} S_DORDER=${S_DORDER:-0}
  S_BAL=${S_BAL:-0} S_GEMM=${S_GEMM:-0} S_SAMP=${S_SAMP:-0} S_PPROF=${S_PPROF:-0} S_PDL=${S_PDL:-0} S_OVL=${S_OVL:-0}
  OVL_ARGS=${OVL_ARGS:-}
  PDL_ARGS="" SAMP_ARGS="" PPROF_ARGS=${PP_ARGS:-"--prefill --warm-steps 30 --steps 3"}
  DORDER_ARGS="" BAL_ARGS="" GEMM_ARGS=${GM_ARGS:-"--batches 256,128"}
  NBW=${NBW:-6}; TW=${TW:-4}; DEADLINE=${DEADLINE:-565}
  TP_ARGS=""; PREFILL_ARGS=${P_ARGS:-"--quick"}
  EXP=""
  SERVE_ARGS=${SV_ARGS:-"--num-prompts 128 --max-tokens 64 --request-rates 16,64,256,inf --skip-offline"}
  PREFIX_ARGS="--random-qwen3 --num-requests 256 --system-len 2048 --suffix-len 128 --output-len 16 --long-len 16384 --num-decodes 64 --decode-len 256 --budget 512 --max-model-len 18432"
  NOTEBOOKS=${NOTEBOOKS:-solutions labs}
  GPU_TESTS=${G_TESTS:-"tests/test_engine_vs_hf.py tests/test_engine_workload.py tests/kernels $(ls tests/test_prefix_caching*.py 2>/dev/null | tr '\n' ' ')"}
else
  S_NB=240 S_TESTS=120 S_TP=200 S_OLD=120 S_TTFT=200 S_PREFILL=200 S_PREFIX=120 S_SERVE=200 S_DORDER=120
  S_BAL=120 S_GEMM=120 S_SAMP=120 S_PPROF=0 S_PDL=60 S_OVL=30 OVL_ARGS="--smoke"
  PDL_ARGS="--smoke" SAMP_ARGS="--smoke" PPROF_ARGS=""
  DORDER_ARGS="--smoke" BAL_ARGS="--smoke" GEMM_ARGS="--smoke"
  NBW=2; TW=1; DEADLINE=${DEADLINE:-3000}
  TP_ARGS="--smoke"; PREFILL_ARGS="--smoke --quick"
  EXP="env TRITON_INTERPRET=1"  # the exp_*.py smoke runs launch kernels on the CPU
  SERVE_ARGS="--num-prompts 6 --max-tokens 4 --request-rates 2,inf --skip-offline --device cpu"
  PREFIX_ARGS="--num-requests 8 --system-len 64 --suffix-len 8 --output-len 4 --long-len 256 --num-decodes 4 --decode-len 16 --budget 64 --max-model-len 512"
  NOTEBOOKS=${NOTEBOOKS:-solutions/ex1_5_1_basic_inference.ipynb}
  GPU_TESTS="tests/kernels/test_cache_ops.py"
fi

if [ "${NB_LAST:-0}" = 0 ]; then
# e) notebooks: one pytest worker per notebook file (loadscope keeps a notebook's cells in one kernel)
run_step "e nbval $NOTEBOOKS" "$S_NB" nbval.log $PY -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env \
  --nbval-cell-timeout=90 ${NB_PAR/NBW/$NBW} --durations=10 $NOTEBOOKS
note "  nbval: $(grep -E '[0-9]+ (passed|failed)' "$OUT/nbval.log" | tail -1)"
fi

# f) engine and kernel tests on the GPU (device="auto" picks CUDA), plus the one-rank TP tests
run_step "f gpu tests" "$S_TESTS" tests.log $PY -m pytest -q -rf -p no:cacheprovider ${T_PAR/TW/$TW} ${T_ARGS:-} \
  --durations=10 $GPU_TESTS tests/test_tensor_parallel.py -k "not tp2 and not beside and (one_rank or more_ranks or not tensor_parallel)"
note "  tests: $(grep -E '[0-9]+ (passed|failed)' "$OUT/tests.log" | tail -1)"

# h) the decode kernel on a real batch's lengths: batch order vs longest first (issue 20 item 2)
if [ "$S_DORDER" -gt 0 ]; then
run_step "h decode kernel order" "$S_DORDER" throughput.log $EXP $PY benchmarks/exp_decode_order.py $DORDER_ARGS
note "  $(grep -E '^\| 256 \| workload \| (batch order|longest first) \|' "$OUT/throughput.log" | tr '\n' ';')"
fi

# i) the decode kernel's balanced splits on real lengths, and j) the projection GEMMs at decode
#    batch sizes, cuBLAS vs Triton (issue 20 item 2; both off by default)
if [ "$S_BAL" -gt 0 ]; then
run_step "i decode kernel balanced splits" "$S_BAL" throughput.log $EXP $PY benchmarks/exp_decode_balance.py $BAL_ARGS
note "  $(grep -E '^\| (48|64|96) \| late \| (before|balanced)' "$OUT/throughput.log" | tr '\n' ';')"
fi
if [ "$S_GEMM" -gt 0 ]; then
run_step "j decode GEMMs cuBLAS vs Triton" "$S_GEMM" throughput.log $EXP $PY benchmarks/exp_decode_gemm.py $GEMM_ARGS
fi
# k) the sampling kernel, one program per row vs split rows; l) a prefill step's kernels (profile)
if [ "$S_SAMP" -gt 0 ]; then
run_step "k sampling kernel splits" "$S_SAMP" throughput.log $EXP $PY benchmarks/exp_sample_splits.py $SAMP_ARGS
fi
if [ "$S_PPROF" -gt 0 ]; then
run_step "l profile prefill + decode steps" "$S_PPROF" throughput.log $PY benchmarks/profile_decode.py $PPROF_ARGS
fi
# m) programmatic dependent launch: what it saves per kernel boundary in a graph
if [ "$S_PDL" -gt 0 ]; then
run_step "m PDL per kernel boundary" "$S_PDL" throughput.log $EXP $PY benchmarks/exp_pdl.py $PDL_ARGS
fi
# n) two half batches on two streams: attention of one beside the GEMMs of the other
if [ "$S_OVL" -gt 0 ]; then
run_step "n two-stream decode step" "$S_OVL" throughput.log $EXP $PY benchmarks/exp_overlap.py $OVL_ARGS
fi

# a) defaults vs tuned, same run (issue 20 item 2)
run_step "a throughput defaults vs tuned (HEAD)" "$S_TP" throughput.log $PY benchmarks/throughput.py --baselines none \
  --configs ${A_CONFIGS:-defaults,tuned} $TP_ARGS ${A_ARGS:-}
note "  $(grep -E '^  labengine.*of the roofline' "$OUT/throughput.log" | tr '\n' ';')"

# g) issue 21.6: the tree before tensor parallelism (7e24f9f) against the tree right after its
#    merge (d07ea77), alternating processes (benchmarks/ab_throughput.py), when .gl/tp is there;
#    else the old tree alone, tuned settings, its own process
if [ -f .gl/old/benchmarks/throughput.py ] && [ -f .gl/tp/benchmarks/throughput.py ]; then
  run_step "g A/B before/after TP (7e24f9f vs d07ea77)" "$S_OLD" throughput.log $PY benchmarks/ab_throughput.py \
    --trees before=.gl/old,after=.gl/tp --rounds "${AB_ROUNDS:-2}" --repeats "${AB_REPEATS:-3}" $TP_ARGS
  note "  $(grep -E '^median time' "$OUT/throughput.log" | tail -1)"
elif [ -f .gl/old/benchmarks/throughput.py ]; then
  echo "=== g: tree of 7e24f9f (before tensor parallelism) ===" >>"$OUT/throughput.log"
  # only the wheels on the path: this tree's labengine/ and kernels/ must not shadow the old ones
  OLD_PP=""; [ "$DRY" = 0 ] && OLD_PP=/tmp/site
  (cd .gl/old && env PYTHONPATH="$OLD_PP" $PY -c "import labengine.llm_engine as m, os; print('old tree:', m.__file__, \
    '| labengine/distributed present:', os.path.isdir(os.path.join(os.path.dirname(m.__file__), 'distributed')))") \
    >>"$OUT/throughput.log" 2>&1
  run_step "g throughput before TP (7e24f9f)" "$S_OLD" throughput.log env PYTHONPATH="$OLD_PP" \
    $PY .gl/old/benchmarks/throughput.py --baselines none $TP_ARGS
  note "  before TP: $(tail -n 40 "$OUT/throughput.log" | grep -E 'labengine at .*% of it' | tail -1)"
else
  note "g throughput before TP | SKIPPED: no .gl/old (see benchmarks/GPU_ROUND2.md)"
fi

# b) TTFT of one 16k prompt vs transformers (issue 20 item 3), then the prefill kernel vs SDPA
#    at 4x2048 and 1x16384 (item 1), as two processes so a slow one cannot hide the other
run_step "b1 16k TTFT vs transformers" "$S_TTFT" prefill.log $PY benchmarks/exp_prefill.py --part ttft $PREFILL_ARGS
note "  $(grep -E 'TTFT ratio' "$OUT/prefill.log" | tail -1)"
run_step "b2 prefill kernel vs SDPA" "$S_PREFILL" prefill.log $PY benchmarks/exp_prefill.py --part kernels $PREFILL_ARGS
grep -A6 '^summary, launcher default vs SDPA' "$OUT/prefill.log" | grep -E '^  ' | while IFS= read -r l; do echo "  $l"; done >"$OUT/.t"
while IFS= read -r l; do note "$l"; done <"$OUT/.t"; rm -f "$OUT/.t"

# d) prefix caching + chunked prefill (issue 19), if that script is in this tree
if [ -f benchmarks/bench_prefix_chunked.py ]; then
  run_step "d prefix caching + chunked prefill" "$S_PREFIX" prefix.log $PY benchmarks/bench_prefix_chunked.py $PREFIX_ARGS
else
  note "d prefix/chunked | SKIPPED: benchmarks/bench_prefix_chunked.py not in this tree"
fi

# c) serving under Poisson arrivals at rising rates (issue 20 item 3)
run_step "c serving sweep" "$S_SERVE" serving.log $PY benchmarks/bench_serving.py $SERVE_ARGS --chart "$OUT/serving.png"
grep -E '^\| (rate|[0-9.]+|inf) ' "$OUT/serving.log" >"$OUT/.t" 2>/dev/null
grep -q '^| rate' "$OUT/.t" || grep -E '^sweep so far' "$OUT/serving.log" >>"$OUT/.t"
while IFS= read -r l; do note "  $l"; done <"$OUT/.t"; rm -f "$OUT/.t"

# NB_LAST=1: the notebooks run last, in whatever time is left (a short lease)
if [ "${NB_LAST:-0}" = 1 ]; then
  S_NB=$(( DEADLINE - $(elapsed) - 5 ))
# e) notebooks: one pytest worker per notebook file (loadscope keeps a notebook's cells in one kernel)
run_step "e nbval $NOTEBOOKS" "$S_NB" nbval.log $PY -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env \
  --nbval-cell-timeout=90 ${NB_PAR/NBW/$NBW} --durations=10 $NOTEBOOKS
note "  nbval: $(grep -E '[0-9]+ (passed|failed)' "$OUT/nbval.log" | tail -1)"
fi

{
  echo; echo "===== SUMMARY (total $(elapsed)s) ====="
  for l in "${SUMMARY[@]}"; do echo "$l"; done
  echo "--- throughput (last table) ---"
  grep -E '^(engine \||labengine|roofline|=== g: |old tree)' "$OUT/throughput.log" | tail -16
  echo "--- prefill (last lines) ---"
  tail -n 8 "$OUT/prefill.log" 2>/dev/null
  [ -f "$OUT/prefix.log" ] && { echo "--- prefix (last lines) ---"; tail -n 12 "$OUT/prefix.log"; }
} | tee "$OUT/summary.txt"

