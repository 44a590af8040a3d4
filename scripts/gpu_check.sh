#!/usr/bin/env bash
# Every GPU check of this repository in one run, all results in one folder:
#
#   bash scripts/gpu_check.sh --pack OUT      # on a CUDA machine (an H100/H200): < 6 minutes
#   bash scripts/gpu_check.sh --dry-run [OUT] # CI, no GPU: the GPU run's commands checked, ~10 s
#   bash scripts/gpu_check.sh --cpu OUT       # every step run on CPU tensors, tiny sizes
#
# Steps, each with its own timeout and log (OUT/<step>.log); one failing does not stop
# the next. In the order of a GPU run, the measurements first:
#   env                 python and packages (wheels carried in wheels/ or .whl/ install
#                       what is missing), the GPU; OUT/env.json. Fails the run in one line.
#   kernel-report       scripts/kernel_report.py --config paper --sm 90: the static estimate
#                       (compiled on the CPU with this machine's Triton); kernel-report.json
#   profile             torch.profiler of the fused lookup at paper scale, bf16, 1 / 64 / 4096
#                       tokens: per-kernel device time, launches and host syncs per lookup,
#                       the JIT's registers, the estimate beside each measurement, and the
#                       CUDA-graph replay time of the decode step (1 token) or why it cannot
#                       be captured; profile.json, profile.txt
#   ncu                 Nsight Compute (--clock-control none) on every kernel of one lookup at
#                       1 and at 4096 tokens; ncu.txt. Skipped, saying so, without ncu
#   bench-lookup-bf16   scripts/bench_lookup.py --config paper at 1, 64, 4096 tokens, the
#   bench-lookup-fp16   floor at the copy bandwidth measured in the same run
#   gpu-tests           pytest -m gpu over the files that mark tests gpu; gpu-tests.xml
#   export-fp32         ultramem export MODEL --format onnx,kernels,aoti (+ manifest, parity)
#   check-fp32          ultramem check --allow-native-code of that export (plugin-kernels)
#   export-fp16         fp16 is TensorRT's --precision: --format onnx,tensorrt --precision
#   check-fp16          fp16, where a TensorRT package is installed; skipped where none is
#   bench               ultramem bench MODEL: in --cpu only (it times the model on the CPU)
# then OUT/summary.md: each step ok/failed/skipped with its duration.
#
# Exit status: 0 every step ok (or skipped for a stated reason of the machine, such as no
# TensorRT), 1 a step failed or ran out of time, 2 bad usage or the environment check failed.
#
# --dry-run: runs no step. Each step's command, exactly as a GPU run would run it, is
#   checked instead (gpu_check.py selfcheck): this script's syntax, every Python file it runs
#   compiles, every script and test file it names exists, every command line parses with its
#   program's own parser (argparse, click, pytest's collection), ncu's flags. Exits 0 when
#   all hold. OUT is optional (the summary goes to stdout).
# --cpu: CPU tensors, the tiny bench config, few tokens, small budgets, torch.compile left
#   out of the timings, the gpu tests skipped by their marker, the profiled kernels run by
#   the Triton interpreter; independent steps two at a time. 2 to 4 minutes on 2 cores.
# --pack: leave in OUT summary.md, env.json, kernel-report.json, profile.json, ncu.txt,
#   bench-lookup-bf16.json (those there are) and gpu_check.tar.gz (every file): at most 8,
#   as the device tool brings back at most 8 files from $OUT.
# --model MODEL: another model than the bundled builtin:facts.
# PYTHON=... picks the interpreter (default: .venv/bin/python if there, else python3);
# NCU=... Nsight Compute's binary (default: ncu on PATH, else under /usr/local/cuda*/bin or
# /opt/nvidia/nsight-compute/*).
set -uo pipefail # not -e: a failing step is recorded and the next one runs

usage() {
  echo "usage: bash scripts/gpu_check.sh [--dry-run | --cpu] [--pack] [--model MODEL] OUT" >&2
  exit 2
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
SELF=$REPO/scripts/gpu_check.sh
PLAN=0 # --dry-run: plan and check the commands, run none
CPU=0  # --cpu: run every step on the CPU
PACK=0
MODEL=builtin:facts
OUT=
while (($#)); do
  case $1 in
  --dry-run) PLAN=1 ;;
  --cpu) CPU=1 ;;
  --pack) PACK=1 ;;
  --model)
    (($# > 1)) || usage
    MODEL=$2
    shift
    ;;
  -h | --help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' && exit 0 ;;
  -*) usage ;;
  *)
    [[ -z $OUT ]] || usage
    OUT=$1
    ;;
  esac
  shift
done
((PLAN && CPU)) && usage
[[ -n $OUT ]] || ((PLAN)) || usage
# the steps run from a scratch folder: a .pt2 MODEL given relative to here must still be found
[[ $MODEL == *.pt2 && -f $MODEL ]] && MODEL=$(cd "$(dirname "$MODEL")" && pwd -P)/$(basename "$MODEL")

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
mkdir -p "$WORK/steps" "$WORK/run" "$WORK/plan"
CHILD=
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
# a signal ends the step in flight (timeout passes it to the step's whole process group)
trap '[[ -n $CHILD ]] && kill -TERM "$CHILD" 2>/dev/null; exit 143' TERM
trap '[[ -n $CHILD ]] && kill -TERM "$CHILD" 2>/dev/null; exit 130' INT

# an earlier run's folder is replaced; anything else that is not empty is not ours to clear
if [[ -z $OUT ]]; then
  OUT=$WORK/out # a dry run without OUT: the summary goes to stdout
  mkdir -p "$OUT"
fi
if [[ -e $OUT && ! -d $OUT ]]; then
  echo "gpu_check: OUT $OUT exists and is not a folder" >&2
  exit 2
fi
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd -P)
if [[ -n $(ls -A "$OUT") ]]; then
  if head -n1 "$OUT/summary.md" 2>/dev/null | grep -q '^# gpu_check'; then
    find "$OUT" -mindepth 1 -delete
  else
    echo "gpu_check: OUT $OUT is not empty and holds no earlier gpu_check run" >&2
    exit 2
  fi
fi

export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if ((PLAN)); then
  MODE="dry run (the GPU run's commands checked, none run)"
elif ((CPU)); then
  MODE="CPU rehearsal"
else
  MODE="GPU"
  unset TRITON_INTERPRET # a GPU run launches the compiled kernels, never the interpreter
fi

# ---- steps: order, and seconds each may take ---------------------------------------------
# A GPU run's steps run one after another inside 350 s (6 minutes with the summary): step i
# may run until the sum of the caps of steps 0..i has passed since the start, so a step
# that ends early (or is skipped) leaves its time to the next ones and every later step
# keeps at least its own cap. The fp16 TensorRT steps come last and run only where TensorRT
# is installed (none is on the GPU machines here): then the run may take 35 s more. The
# measurements come first, so a run cut short still brings them back. --cpu gives each
# step its own, looser cap: two run at a time there, on a shared machine.
STEPS=(env kernel-report profile ncu bench-lookup-bf16 bench-lookup-fp16 gpu-tests
  export-fp32 check-fp32 export-fp16 check-fp16 bench)
# env's cap holds a first import's build of the native CPU kernels (kernels/native, cached)
declare -A CAP=([env]=50 [kernel-report]=25 [profile]=50 [ncu]=45 [bench-lookup-bf16]=50
  [bench-lookup-fp16]=30 [gpu-tests]=55 [export-fp32]=30 [check-fp32]=15 [export-fp16]=25
  [check-fp16]=10 [bench]=0)
declare -A CPU_CAP=([env]=60 [kernel-report]=120 [profile]=120 [ncu]=60
  [bench-lookup-bf16]=120 [bench-lookup-fp16]=120 [gpu-tests]=120 [export-fp32]=180
  [check-fp32]=120 [export-fp16]=180 [check-fp16]=120 [bench]=180)
declare -A DEADLINE
total=0
for s in "${STEPS[@]}"; do
  total=$((total + CAP[$s]))
  DEADLINE[$s]=$total
done
START=$SECONDS
MIN_STEP_S=5

# record NAME STATUS SECONDS LIMIT NOTE [fatal]: one line per step, read by the summary;
# fields apart by a unit separator (a tab is whitespace to read: empty fields would merge)
SEP=$'\x1f'
record() {
  local note=${5//$'\n'/ }
  note=${note//$WORK\//}
  note=${note//$OUT\//}
  printf '%s\n' "$2$SEP$3$SEP$4$SEP${note:0:220}$SEP${6:-}" >"$WORK/steps/$1"
}
field() { cut -d "$SEP" -f"$2" "$WORK/steps/$1" 2>/dev/null; } # field NAME N
status_of() { field "$1" 1 || echo "not run"; }

last_line() { grep -v '^[[:space:]]*$' "$1" 2>/dev/null | grep -v '^USDT:' | tail -n1; }

# run_step NAME COMMAND...: COMMAND (a program or one of the functions below) under its
# timeout, its output appended to OUT/NAME.log; the step's line recorded. A dry run writes
# the command to the plan (one file per step, its words NUL-separated) and runs nothing.
PLANNED=0
run_step() {
  if ((PLAN)); then
    PLANNED=$((PLANNED + 1))
    printf '%s\0' "$@" >"$WORK/plan/$(printf '%02d' "$PLANNED")-$1"
    record "$1" planned 0 - "${*:2}"
    return 0
  fi
  execute_step "$@"
}

execute_step() {
  local name=$1 limit rc t0=$SECONDS log=$OUT/$1.log
  shift
  if ((CPU)); then
    limit=${CPU_CAP[$name]}
  elif [[ -n ${DEADLINE[$name]:-} ]]; then
    limit=$((START + DEADLINE[$name] - SECONDS))
  else
    limit=60 # the dry run's own check
  fi
  if ((limit < MIN_STEP_S)); then
    record "$name" skipped 0 "$limit" "not started: ${limit} s of the time budget left" fatal
    return 1
  fi
  printf '$ %s\n# timeout %s s\n' "$*" "$limit" >>"$log"
  # in the background and waited for, so that a signal to this script reaches the step;
  # timeout makes the step a process group and ends all of it (compilers, workers) at once
  timeout --kill-after=5 "$limit" bash -c '"$@"' _ "$@" >>"$log" 2>&1 </dev/null &
  CHILD=$!
  wait "$CHILD"
  rc=$?
  CHILD=
  local seconds=$((SECONDS - t0)) last
  last=$(last_line "$log")
  printf '# exit %s after %s s\n' "$rc" "$seconds" >>"$log"
  if ((rc == 0)); then
    record "$name" ok "$seconds" "$limit" "${NOTE:-$last}"
  elif ((rc == 124 || (rc == 137 && seconds >= limit))); then
    record "$name" failed "$seconds" "$limit" "timed out after $limit s; last line: $last"
  else
    record "$name" failed "$seconds" "$limit" "exit $rc: $last"
  fi
  return "$rc"
}

skip() { record "$1" skipped 0 - "$2" "${3:-}"; }

# judge NAME KIND FILE: a step that ran is ok only if its JSON holds no wrong or failed rows
# (the scripts report those and exit 0); the note becomes the JSON's one-line summary
judge() {
  local st sec lim note fatal text
  IFS=$SEP read -r st sec lim note fatal <"$WORK/steps/$1"
  [[ $st == ok ]] || return 0
  text=$( (helper note "$2" "$3") 2>&1)
  case $? in
  1) record "$1" failed "$sec" "$lim" "$text" ;;
  *) record "$1" ok "$sec" "$lim" "$text" ;; # 2: no summary of it, which fails nothing
  esac
}

# The commands the steps run, as functions that `bash -c` (under timeout) can call. They run
# from a scratch folder, as the checkout's root on sys.path would add top-level names
# (kernels, compiler, ...) beside the package; pytest alone runs from the checkout.
ultramem() { # the console script's entry point: no install needed, PYTHONPATH will do
  cd "$WORK/run" && exec "$PY" -c 'import sys; sys.argv[0] = "ultramem"
from ultramem.cli.main import main
main()' "$@"
}
helper() { cd "$WORK/run" && exec "$PY" "$REPO/scripts/gpu_check.py" "$@"; }
run_script() { cd "$WORK/run" && exec "$PY" "$REPO/scripts/$1" "${@:2}"; }
repo_pytest() { cd "$REPO" && exec "$PY" -m pytest "$@"; }
in_run() { cd "$WORK/run" && exec "$@"; } # a program that runs ours (ncu)
export -f ultramem helper run_script repo_pytest in_run

# ---- a: the environment ------------------------------------------------------------------
step_env() {
  local t0=$SECONDS wheels_note="none carried" dirs=() d
  : >"$OUT/env.log"
  if [[ -n ${PYTHON:-} ]]; then
    PY=$PYTHON
  elif [[ -x $REPO/.venv/bin/python ]]; then
    PY=$REPO/.venv/bin/python
  else
    PY=$(command -v python3 || command -v python || echo python3)
  fi
  export PY REPO WORK
  if ! "$PY" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' >>"$OUT/env.log" 2>&1; then
    record env failed $((SECONDS - t0)) - "no Python 3.11+ at $PY (set PYTHON=...)"
    return 1
  fi
  for d in "$REPO/wheels" "$REPO/.whl" ${GPU_CHECK_WHEELS:+"$GPU_CHECK_WHEELS"}; do
    compgen -G "$d/*.whl" >/dev/null && dirs+=("$d")
  done
  if ((${#dirs[@]})) && ((PLAN)); then
    wheels_note="a GPU run would install what is missing from ${dirs[*]}"
  elif ((${#dirs[@]})); then
    if ! "$PY" "$REPO/scripts/gpu_check.py" wheels --target "$WORK/site" "${dirs[@]}" >>"$OUT/env.log" 2>&1; then
      record env failed $((SECONDS - t0)) - "$(last_line "$OUT/env.log")"
      return 1
    fi
    wheels_note=$(last_line "$OUT/env.log")
    [[ -d $WORK/site ]] && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  # `pip install -e .` maps this checkout onto the name ultramem; where it is not installed
  # (a bare GPU machine, no registry to build with), a link named ultramem does the same
  local via=installed where
  where=$(cd "$WORK/run" && "$PY" -c 'import os, ultramem
print(os.path.dirname(os.path.realpath(ultramem.__file__)))' 2>/dev/null)
  if [[ $where != "$REPO" ]]; then
    mkdir -p "$WORK/shim" && ln -s "$REPO" "$WORK/shim/ultramem"
    export PYTHONPATH="$WORK/shim${PYTHONPATH:+:$PYTHONPATH}"
    via="PYTHONPATH (a link named ultramem to $REPO)"
  fi
  local args=(env --out "$OUT/env.json" --ultramem-via "$via" --wheels-note "$wheels_note")
  ((CPU)) && args+=(--cpu)
  run_step env helper "${args[@]}"
}

# ---- b: the measurements: static estimate, profile, Nsight Compute -----------------------
step_kernel_report() {
  local args=(--config paper --sm 90)
  ((CPU)) && args=(--config tiny --sm 90 --tokens 1,8)
  run_step kernel-report run_script kernel_report.py "${args[@]}" --json "$OUT/kernel-report.json"
}

step_profile() {
  local args=(profile --out "$OUT/profile.txt" --json "$OUT/profile.json"
    --estimate "$OUT/kernel-report.json")
  ((CPU)) && args+=(--cpu)
  run_step profile run_script gpu_profile.py "${args[@]}"
}

find_ncu() {
  local found
  if [[ -n ${NCU:-} ]]; then
    echo "$NCU"
    return
  fi
  found=$(command -v ncu) ||
    found=$(compgen -G '/usr/local/cuda*/bin/ncu' | head -n1) ||
    found=$(compgen -G '/opt/nvidia/nsight-compute/*/ncu' | sort -V | tail -n1)
  echo "$found"
}

step_ncu() {
  local ncu
  ncu=$(find_ncu)
  if ((CPU)); then
    skip ncu "no GPU in a CPU rehearsal"
    return 0
  fi
  if [[ -z $ncu ]] && ((!PLAN)); then
    skip ncu "no ncu (Nsight Compute) on PATH, under /usr/local/cuda*/bin or /opt/nvidia: set NCU="
    return 0
  fi
  # every kernel between cudaProfilerStart and Stop: one warm lookup at each token count;
  # boost clocks as in use (--clock-control none), each kernel's NVTX range (its tokens)
  run_step ncu in_run "${ncu:-ncu}" --clock-control none --profile-from-start off \
    --target-processes all --nvtx --log-file "$OUT/ncu.txt" \
    "$PY" "$REPO/scripts/gpu_profile.py" ncu-target --tokens 1,4096 --dtype bf16
}

# ---- c: the lookup at paper scale, bf16 and fp16 -----------------------------------------
step_bench_lookup() { # bf16 | fp16
  local dtype=$1 args
  if ((CPU)); then
    args=(--config tiny --device cpu --tokens 1,4 --budget-s 0.01 --backends eager,fused-ops)
  elif [[ $dtype == bf16 ]]; then
    args=(--config paper --tokens 1,64,4096 --budget-s 0.5)
  else
    # torch.compile's own compile of the layer again: a shorter timing budget keeps the step
    # inside its cap
    args=(--config paper --tokens 1,64,4096 --budget-s 0.3)
  fi
  run_step "bench-lookup-$dtype" run_script bench_lookup.py "${args[@]}" --dtype "$dtype" \
    --bandwidth-tbs measure --json "$OUT/bench-lookup-$dtype.json"
  ((PLAN)) || judge "bench-lookup-$dtype" lookup "$OUT/bench-lookup-$dtype.json"
}

# ---- d: the gpu-marked tests -------------------------------------------------------------
step_gpu_tests() {
  local files
  mapfile -t files < <(cd "$REPO" && grep -rlE --include='*.py' 'mark\.gpu\b' tests | sort)
  if ((${#files[@]} == 0)); then
    skip gpu-tests "no test file marks a test gpu"
    return 0
  fi
  # from the checkout, with pyproject's addopts replaced: they ask for pytest-xdist's
  # workers, which a bare machine may lack and one GPU would not use
  run_step gpu-tests repo_pytest -o addopts="" --import-mode=importlib --strict-markers \
    -q -rfEs --durations=10 -p no:cacheprovider -m gpu \
    --junitxml="$OUT/gpu-tests.xml" "${files[@]}"
  ((PLAN)) && return 0
  # the note: the junit counts, then what run_step said
  local st sec lim note fatal counts
  IFS=$SEP read -r st sec lim note fatal <"$WORK/steps/gpu-tests"
  [[ $st == skipped ]] && return 0
  counts=$( (helper junit "$OUT/gpu-tests.xml") 2>/dev/null)
  if [[ $st == ok ]]; then
    note=$counts
    ((CPU)) && note="$counts (no CUDA device: skipped by their marker)"
  else
    note="$counts; $note"
  fi
  record gpu-tests "$st" "$sec" "$lim" "$note" "$fatal"
}

# ---- e: export and check, fp32 and fp16 --------------------------------------------------
copy_records() { # what an export leaves in WORK that a reader of OUT wants
  local name=$1 dir=$WORK/$1
  [[ -f $dir/manifest.json ]] && cp "$dir/manifest.json" "$OUT/$name.manifest.json"
  [[ -f $dir/parity.json ]] && cp "$dir/parity.json" "$OUT/$name.parity.json"
  return 0
}

step_export() { # fp32 | fp16
  local precision=$1 name=export-$1 formats
  if [[ $precision == fp32 ]]; then
    formats=onnx,kernels,aoti
    run_step "$name" ultramem export "$MODEL" --format "$formats" --out "$WORK/$name"
  else
    # the CLI's --precision applies to TensorRT engines only: the model itself is exported
    # in its own dtype (a half copy of builtin:facts is not fused: in fp16 its own top-k
    # ties differ from the fused ops', which score in fp32 by contract). A dry run checks
    # the command whether TensorRT is there or not
    if ! ((PLAN)) && ! "$PY" -c 'import importlib.util as u, sys
sys.exit(not (u.find_spec("tensorrt") or u.find_spec("tensorrt_rtx")))' 2>/dev/null; then
      skip "$name" "fp16 is TensorRT's --precision and neither tensorrt nor tensorrt_rtx is installed (carry its wheels)"
      return 0
    fi
    run_step "$name" ultramem export "$MODEL" --format onnx,tensorrt --precision fp16 \
      --out "$WORK/$name"
  fi
  copy_records "$name"
}

step_check() { # fp32 | fp16
  local name=check-$1 export=export-$1
  case $(status_of "$export") in
  ok | planned) ;;
  skipped)
    skip "$name" "no $export: $(field "$export" 4)"
    return 0
    ;;
  *)
    skip "$name" "$export did not pass" fatal
    return 0
    ;;
  esac
  run_step "$name" ultramem check "$MODEL" --artifacts "$WORK/$export" --allow-native-code \
    --report "$OUT/$name.parity.json"
}

# ---- f: ultramem bench (CPU rehearsal only) ----------------------------------------------
step_bench() {
  if ! ((CPU)); then
    skip bench "ultramem bench keeps the model on the CPU (compiler/bench/run.py): no GPU figure; --cpu runs it"
    return 0
  fi
  local args=(--out "$OUT/bench")
  if [[ $(status_of export-fp32) == ok ]]; then
    args+=(--artifacts "$WORK/export-fp32" --allow-native-code)
  fi
  args+=(--tokens 1,4 --budget 0.02 --backends
    eager,fused-ops,onnxruntime-cpu,onnxruntime-cuda,plugin-kernels,aotinductor,tensorrt)
  run_step bench ultramem bench "$MODEL" "${args[@]}"
  judge bench bench "$OUT/bench/bench.json"
  if [[ $(status_of bench) == ok && $(status_of export-fp32) != ok ]]; then
    record bench ok "$(field bench 2)" "$(field bench 3)" \
      "without artifacts (export-fp32 did not pass): $(field bench 4)"
  fi
}

# ---- the run -----------------------------------------------------------------------------
run_gpu_order() {
  step_kernel_report
  step_profile
  step_ncu
  step_bench_lookup bf16
  step_bench_lookup fp16
  step_gpu_tests
  step_export fp32
  step_check fp32
  step_export fp16
  step_check fp16
  step_bench
}

run_cpu_lanes() { # two lanes on two cores; bench reads export-fp32
  (
    trap '[[ -n $CHILD ]] && kill -TERM "$CHILD" 2>/dev/null; exit 143' TERM
    step_export fp32
    step_check fp32
    step_bench
  ) &
  local lane1=$!
  (
    trap '[[ -n $CHILD ]] && kill -TERM "$CHILD" 2>/dev/null; exit 143' TERM
    step_kernel_report
    step_profile
    step_ncu
    step_gpu_tests
    step_export fp16
    step_check fp16
    step_bench_lookup bf16
    step_bench_lookup fp16
  ) &
  local lane2=$!
  CHILD="$lane1 $lane2"
  trap 'kill -TERM $CHILD 2>/dev/null; wait; exit 143' TERM
  trap 'kill -TERM $CHILD 2>/dev/null; wait; exit 130' INT
  wait "$lane1" "$lane2"
  CHILD=
}

step_env
ENV_OK=1
[[ $(status_of env) == ok || $(status_of env) == planned ]] || ENV_OK=0
if ((ENV_OK)); then
  if ((CPU)); then
    run_cpu_lanes
  else
    run_gpu_order
  fi
else
  for s in "${STEPS[@]:1}"; do skip "$s" "the environment check failed" fatal; done
fi
if ((PLAN && ENV_OK)); then
  # the one thing a dry run executes: the plan's check
  STEPS+=(selfcheck)
  execute_step selfcheck helper selfcheck --plan "$WORK/plan" --script "$SELF"
fi

# ---- summary -----------------------------------------------------------------------------
failed=()
{
  echo "# gpu_check: $MODE"
  echo
  echo "- when: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), on $(hostname 2>/dev/null || echo '?'), $((SECONDS - START)) s in all"
  flags="$( ((PLAN)) && echo ' --dry-run')$( ((CPU)) && echo ' --cpu')$( ((PACK)) && echo ' --pack')"
  echo "- model: \`$MODEL\`; command: \`bash scripts/gpu_check.sh$flags OUT\`"
  echo "- environment: $(field env 4)"
  ((PLAN || CPU)) || echo "- time budget: $total s for the steps, each until its deadline (the sum of the caps up to it)"
  echo
  echo "| step | status | seconds | timeout s | note |"
  echo "|---|---|---|---|---|"
  for s in "${STEPS[@]}"; do
    if [[ -f $WORK/steps/$s ]]; then
      IFS=$SEP read -r st sec lim note fatal <"$WORK/steps/$s"
    else
      st="not run" sec=0 lim=- note="the run ended before this step" fatal=fatal
    fi
    [[ $st == failed || -n $fatal ]] && failed+=("$s")
    echo "| $s | $st | $sec | $lim | ${note//|/\\|} |"
  done
  echo
  if ((${#failed[@]} == 0)); then
    echo "**result: passed** (every step ok, or skipped for the reason given)"
  else
    echo "**result: FAILED**: ${failed[*]}"
  fi
  echo
  if ((PLAN)); then
    echo "A dry run runs no step: each planned command above was checked by selfcheck"
    echo "(selfcheck.log), as a GPU run would run it."
  elif ((CPU)); then
    echo "A CPU rehearsal checks this script, not the GPU: CPU tensors, tiny sizes, torch.compile"
    echo "left out of the timings, the gpu tests skipped by their marker; two steps at a time."
  else
    echo "kernel-report is a static estimate; profile.json puts each kernel's measured time beside"
    echo "it. \`ultramem bench\` is left to --cpu: it times the model on the CPU."
  fi
  echo
  echo "Files:"
  (cd "$OUT" && find . -type f ! -name summary.md | sed 's|^\./||' | sort | sed 's/^/- /')
  if ((PACK)); then
    echo "(packed: gpu_check.tar.gz holds all of them and this summary)"
  elif ((!PLAN && !CPU)); then
    echo "(the device tool brings back at most 8 files from \$OUT: run with --pack there)"
  fi
} >"$OUT/summary.md"

# --pack: the files a reader opens first, and one archive of everything: at most 8 files
KEEP=(summary.md env.json kernel-report.json profile.json ncu.txt bench-lookup-bf16.json)
pack() {
  mkdir -p "$WORK/keep" && tar -czf "$WORK/gpu_check.tar.gz" -C "$OUT" . || return 1
  local f
  for f in "${KEEP[@]}"; do
    if [[ -f $OUT/$f ]]; then cp "$OUT/$f" "$WORK/keep/"; fi
  done
  find "$OUT" -mindepth 1 -delete && mv "$WORK/keep/"* "$WORK/gpu_check.tar.gz" "$OUT/"
}
if ((PACK)) && ! pack; then
  echo "gpu_check: --pack failed: OUT holds every file unpacked" >&2
fi

if ((PLAN)) && [[ $OUT == "$WORK/out" ]]; then
  cat "$OUT/summary.md"
  [[ -f $OUT/selfcheck.log ]] && grep -E '^(FAILED|ok) ' "$OUT/selfcheck.log"
fi
if ((!ENV_OK)); then
  echo "gpu_check: environment check failed: $(field env 4 | sed 's/^exit [0-9]*: //; s/^env: //')" >&2
  exit 2
fi
where="see $OUT/summary.md"
[[ $OUT == "$WORK/out" ]] && where="no OUT given: nothing kept"
echo "gpu_check: $MODE: $( ((${#failed[@]})) && echo "FAILED (${failed[*]})" || echo passed) in $((SECONDS - START)) s; $where"
((${#failed[@]} == 0))
