#!/usr/bin/env bash
# Every GPU check of this repository in one run, all results in one folder:
#
#   bash scripts/gpu_check.sh [--pack] OUT          # on a CUDA machine (an H200): < 8 minutes
#   bash scripts/gpu_check.sh --dry-run OUT         # the same steps on the CPU, tiny sizes
#
# Steps, each with its own timeout and log (OUT/<step>.log); one failing does not stop
# the next:
#   env                 python and packages (wheels carried in wheels/ or .whl/ install
#                       what is missing), the GPU; OUT/env.json. Fails the run in one line.
#   gpu-tests           pytest -m gpu over the files that mark tests gpu; OUT/gpu-tests.xml
#   export-fp32         ultramem export MODEL --format onnx,kernels,aoti (+ manifest, parity)
#   check-fp32          ultramem check --allow-native-code of that export
#   export-fp16         fp16 is TensorRT's --precision (onnx, kernels and aoti keep the
#                       model's dtype): --format onnx,tensorrt --precision fp16, where a
#                       TensorRT package is installed; skipped, saying so, where none is
#   check-fp16          ultramem check of that export
#   bench-lookup-bf16   scripts/bench_lookup.py --config paper at 1, 64, 4096 tokens, the
#   bench-lookup-fp16   floor at the copy bandwidth measured in the same run
#   bench               ultramem bench MODEL --artifacts <export-fp32>; OUT/bench/
#   profile             torch.profiler of the fused lookup at paper scale; OUT/profile.txt
# then OUT/summary.md: each step ok/failed/skipped with its duration.
#
# Exit status: 0 every step ok (or skipped for a stated reason of the machine, such as no
# TensorRT), 1 a step failed or ran out of time, 2 bad usage or the environment check failed.
#
# --dry-run: CPU tensors, the tiny bench config, few tokens, small budgets, torch.compile
#   left out of the timings (its CPU compile alone would outlast the whole dry run), the
#   gpu tests skipped by their marker, the profiled kernels run by the Triton interpreter;
#   independent steps run two at a time. About 125 CPU-seconds: 1.5 to 3 minutes on 2 cores,
#   as busy as they are.
# --pack: leave OUT as summary.md, env.json and gpu_check.tar.gz (every file): the device
#   tool brings back at most 8 files from $OUT.
# --model MODEL: another model than the bundled builtin:facts.
# PYTHON=... picks the interpreter (default: .venv/bin/python if there, else python3).
set -uo pipefail # not -e: a failing step is recorded and the next one runs

usage() {
  echo "usage: bash scripts/gpu_check.sh [--dry-run] [--pack] [--model MODEL] OUT" >&2
  exit 2
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
DRY=0
PACK=0
MODEL=builtin:facts
OUT=
while (($#)); do
  case $1 in
  --dry-run) DRY=1 ;;
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
[[ -n $OUT ]] || usage
# the steps run from a scratch folder: a .pt2 MODEL given relative to here must still be found
[[ $MODEL == *.pt2 && -f $MODEL ]] && MODEL=$(cd "$(dirname "$MODEL")" && pwd -P)/$(basename "$MODEL")

# an earlier run's folder is replaced; anything else that is not empty is not ours to clear
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

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
mkdir -p "$WORK/steps" "$WORK/run"
CHILD=
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
# a signal ends the step in flight (timeout passes it to the step's whole process group)
trap '[[ -n $CHILD ]] && kill -TERM "$CHILD" 2>/dev/null; exit 143' TERM
trap '[[ -n $CHILD ]] && kill -TERM "$CHILD" 2>/dev/null; exit 130' INT

export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if ((DRY)); then
  MODE="dry run (CPU)"
else
  MODE="GPU"
  unset TRITON_INTERPRET # a GPU run launches the compiled kernels, never the interpreter
fi

# ---- steps: order, and seconds each may take ---------------------------------------------
# A GPU run's steps run one after another inside 440 s (the device limit is 8 minutes):
# step i may run until the sum of the caps of steps 0..i has passed since the start, so a
# step that ends early (or is skipped) leaves its time to the next ones and every later
# step keeps at least its own cap. A dry run gives each step its own, looser cap: two run
# at a time there, on a shared machine.
STEPS=(env gpu-tests export-fp32 check-fp32 export-fp16 check-fp16
  bench-lookup-bf16 bench-lookup-fp16 bench profile)
# env's cap holds a first import's build of the native CPU kernels (kernels/native, cached)
declare -A CAP=([env]=60 [gpu-tests]=85 [export-fp32]=55 [check-fp32]=25 [export-fp16]=25
  [check-fp16]=15 [bench-lookup-bf16]=60 [bench-lookup-fp16]=50 [bench]=35 [profile]=30)
declare -A DRY_CAP=([env]=60 [gpu-tests]=120 [export-fp32]=180 [check-fp32]=120
  [export-fp16]=180 [check-fp16]=120 [bench-lookup-bf16]=120 [bench-lookup-fp16]=120
  [bench]=180 [profile]=120)
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
# timeout, its output appended to OUT/NAME.log; the step's line recorded
run_step() {
  local name=$1 limit rc t0=$SECONDS log=$OUT/$1.log
  shift
  if ((DRY)); then
    limit=${DRY_CAP[$name]}
  else
    limit=$((START + DEADLINE[$name] - SECONDS))
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
export -f ultramem helper run_script repo_pytest

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
  if ((${#dirs[@]})); then
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
  ((DRY)) && args+=(--dry-run)
  run_step env helper "${args[@]}"
}

# ---- b: the gpu-marked tests -------------------------------------------------------------
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
  # the note: the junit counts, then what run_step said
  local st sec lim note fatal counts
  IFS=$SEP read -r st sec lim note fatal <"$WORK/steps/gpu-tests"
  [[ $st == skipped ]] && return 0
  counts=$( (helper junit "$OUT/gpu-tests.xml") 2>/dev/null)
  if [[ $st == ok ]]; then
    note=$counts
    ((DRY)) && note="$counts (no CUDA device: skipped by their marker)"
  else
    note="$counts; $note"
  fi
  record gpu-tests "$st" "$sec" "$lim" "$note" "$fatal"
}

# ---- c: export and check, fp32 and fp16 --------------------------------------------------
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
    # ties differ from the fused ops', which score in fp32 by contract)
    if ! "$PY" -c 'import importlib.util as u, sys
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
  ok) ;;
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

# ---- d: the lookup at paper scale, bf16 and fp16 -----------------------------------------
step_bench_lookup() { # bf16 | fp16
  local dtype=$1 args
  if ((DRY)); then
    args=(--config tiny --device cpu --tokens 1,4 --budget-s 0.01 --backends eager,fused-ops)
  else
    args=(--config paper --tokens 1,64,4096 --budget-s 0.5)
  fi
  run_step "bench-lookup-$dtype" run_script bench_lookup.py "${args[@]}" --dtype "$dtype" \
    --bandwidth-tbs measure --json "$OUT/bench-lookup-$dtype.json"
  judge "bench-lookup-$dtype" lookup "$OUT/bench-lookup-$dtype.json"
}

# ---- e: ultramem bench -------------------------------------------------------------------
step_bench() {
  local args=(--out "$OUT/bench")
  if [[ $(status_of export-fp32) == ok ]]; then
    args+=(--artifacts "$WORK/export-fp32" --allow-native-code)
  fi
  if ((DRY)); then
    args+=(--tokens 1,4 --budget 0.02 --backends
      eager,fused-ops,onnxruntime-cpu,onnxruntime-cuda,plugin-kernels,aotinductor,tensorrt)
  else
    args+=(--tokens 1,16,64 --budget 0.2)
  fi
  run_step bench ultramem bench "$MODEL" "${args[@]}"
  judge bench bench "$OUT/bench/bench.json"
  if [[ $(status_of bench) == ok && $(status_of export-fp32) != ok ]]; then
    record bench ok "$(field bench 2)" "$(field bench 3)" \
      "without artifacts (export-fp32 did not pass): $(field bench 4)"
  fi
}

# ---- f: the profile ----------------------------------------------------------------------
step_profile() {
  local args=(profile --out "$OUT/profile.txt")
  ((DRY)) && args+=(--dry-run)
  NOTE="wrote profile.txt" run_step profile helper "${args[@]}"
}

# ---- the run -----------------------------------------------------------------------------
step_env
ENV_OK=1
[[ $(status_of env) == ok ]] || ENV_OK=0
if ((ENV_OK)); then
  if ((DRY)); then
    # two lanes on two cores, each in the order of the GPU run; bench reads export-fp32
    (
      trap '[[ -n $CHILD ]] && kill -TERM "$CHILD" 2>/dev/null; exit 143' TERM
      step_export fp32
      step_check fp32
      step_bench
    ) &
    lane1=$!
    (
      trap '[[ -n $CHILD ]] && kill -TERM "$CHILD" 2>/dev/null; exit 143' TERM
      step_gpu_tests
      step_export fp16
      step_check fp16
      step_bench_lookup bf16
      step_bench_lookup fp16
      step_profile
    ) &
    lane2=$!
    CHILD="$lane1 $lane2"
    trap 'kill -TERM $CHILD 2>/dev/null; wait; exit 143' TERM
    trap 'kill -TERM $CHILD 2>/dev/null; wait; exit 130' INT
    wait "$lane1" "$lane2"
    CHILD=
  else
    step_gpu_tests
    step_export fp32
    step_check fp32
    step_export fp16
    step_check fp16
    step_bench_lookup bf16
    step_bench_lookup fp16
    step_bench
    step_profile
  fi
else
  for s in "${STEPS[@]:1}"; do skip "$s" "the environment check failed" fatal; done
fi

# ---- summary -----------------------------------------------------------------------------
failed=()
{
  echo "# gpu_check: $MODE"
  echo
  echo "- when: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), on $(hostname 2>/dev/null || echo '?'), $((SECONDS - START)) s in all"
  echo "- model: \`$MODEL\`; command: \`bash scripts/gpu_check.sh$( ((DRY)) && echo ' --dry-run')$( ((PACK)) && echo ' --pack') OUT\`"
  echo "- environment: $(field env 4)"
  ((DRY)) || echo "- time budget: $total s for the steps, each until its deadline (the sum of the caps up to it)"
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
  if ((DRY)); then
    echo
    echo "A dry run checks this script, not the GPU: CPU tensors, tiny sizes, torch.compile left"
    echo "out of the timings, the gpu tests skipped by their marker; two steps run at a time."
  else
    echo
    echo "\`ultramem bench\` times the model where it loads, the CPU (compiler/bench/run.py moved"
    echo "nothing to the GPU as of 2026-12-01): its figures here are CPU work timed with CUDA"
    echo "events; bench-lookup-* and profile hold the GPU's lookup numbers."
  fi
  echo
  echo "Files:"
  (cd "$OUT" && find . -type f ! -name summary.md | sed 's|^\./||' | sort | sed 's/^/- /')
  if ((PACK)); then
    echo "(packed: gpu_check.tar.gz holds all of them and this summary)"
  elif ((!DRY)); then
    echo "(the device tool brings back at most 8 files from \$OUT: run with --pack there)"
  fi
} >"$OUT/summary.md"

if ((PACK)); then
  tar -czf "$WORK/gpu_check.tar.gz" -C "$OUT" . &&
    find "$OUT" -mindepth 1 ! -name summary.md ! -name env.json -delete &&
    mv "$WORK/gpu_check.tar.gz" "$OUT/"
fi

if ((!ENV_OK)); then
  echo "gpu_check: environment check failed: $(field env 4 | sed 's/^exit [0-9]*: //; s/^env: //')" >&2
  exit 2
fi
echo "gpu_check: $MODE: $( ((${#failed[@]})) && echo "FAILED (${failed[*]})" || echo passed) in $((SECONDS - START)) s; see $OUT/summary.md"
((${#failed[@]} == 0))
