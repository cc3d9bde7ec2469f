#!/usr/bin/env bash
# The GPU numbers of issues 3, 4 and 8 on the GPU machine, as a few `run` calls (docs/gpu-runbook.md). A session
# has 15 minutes of device time, the machine's start included, so each plan is one call of at most 9 minutes:
#
#   bash scripts/device/run_study.sh bench    # carry .device/p1: loader, train-step rows, fused and packed trials,
#                                             #   ResNet-20 on the full paper recipe through `orchestrate sweep`
#   bash scripts/device/run_study.sh compile  # what time is left (session A or C): torch.compile rows, and
#                                             #   compile_graph (compiled kernels inside the one-graph step)
#   bash scripts/device/run_study.sh study    # carry .device/p1 (another session): the cifar_depth sweep, report,
#                                             #   ensemble
#   bash scripts/device/run_study.sh STAGE... # any stages in order: unpack mps loader loader_compare train fuse
#                                             #   fuse_more pack paper20 gputests gputests_compile compile20 compile56 compile110
#                                             #   compile_graph20 compile_graph110 spec sweep report ensemble collect
#   bash scripts/device/run_study.sh --dry-run [STAGE...]   # print the plan; `spec` writes the sweep copy and
#                                             #   runs `orchestrate sweep --dry-run` on it (works on a CPU machine)
#
# Every call first sources unpack.sh (whatever has arrived gets installed), tees everything into $OUT/study.log,
# appends benchmark JSON lines to $OUT/bench.jsonl, ends with `collect` (the MLflow sqlite store, reports, the
# generated specs, Ray's trial logs in $OUT/results.tar.gz) and stops within CALL_BUDGET seconds (default 540,
# inside the tool's 10 minutes): a stage that would not fit is skipped and says so; a sweep is stopped
# (SIGINT, then what is left of its session is ended by PID) in time for collect, and a later `sweep` on the
# same machine resumes it from its checkpoints.
#
# Knobs (environment): CALL_BUDGET  SWEEP_ITERS=16000 (1/4 of the paper's schedule: what one call can finish,
#   docs/gpu-runbook.md; 64000 is the recipe)  SWEEP_MODELS=resnet56,plain56,resnet44,resnet32,resnet20,plain20
#   SWEEP_SEEDS=0  SWEEP_FUSE=1 (e.g. SWEEP_SEEDS=0,1,2 SWEEP_FUSE=3: each model's seeds as one fused process)
#   STUDY=/tmp/study  DATA_DIR=/tmp/data  ENSEMBLE_TOP=6  OUT (the tool sets it; default /tmp/out)
set -uo pipefail
T0=$SECONDS
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/scripts/device
export OUT=${OUT:-/tmp/out}
export STUDY=${STUDY:-/tmp/study} DATA_DIR=${DATA_DIR:-/tmp/data}
PY=${PY:-python3}
CALL_BUDGET=${CALL_BUDGET:-540}
# 15 device-minutes a session: the `study` call leaves the sweep ~350 s; 6 nets at 16k iterations are ~360 s
# one after another at gpu.md's CUDA-graph rates, packed on the GPU (MPS) well inside the 350 s; 24k would
# likely cut the 56-layer nets (docs/gpu-runbook.md). ResNet-110 alone needs ~11 min at 64k.
SWEEP_ITERS=${SWEEP_ITERS:-16000}
SWEEP_MODELS=${SWEEP_MODELS:-resnet56,plain56,resnet44,resnet32,resnet20,plain20}
SWEEP_SEEDS=${SWEEP_SEEDS:-0}
ENSEMBLE_TOP=${ENSEMBLE_TOP:-6}
DATA=$DATA_DIR/cifar10-jpeg.tar.gz
SPEC=$STUDY/cifar_depth_gpu.yaml
DRY=0
export PYTHONUNBUFFERED=1 COLUMNS=${COLUMNS:-200}  # rich: wide tables in the logs
mkdir -p "$OUT" "$STUDY"
LOG=$OUT/study.log
BENCH=$OUT/bench.jsonl

say() { echo "[run_study $(date +%H:%M:%S) +$((SECONDS - T0))s] $*" | tee -a "$LOG"; }
left() { echo $((CALL_BUDGET - (SECONDS - T0))); }
fits() {  # fits SECONDS NAME: is there time for a stage of about SECONDS (plus 45 s for collect)?
  if [ "$(left)" -lt $(($1 + 45)) ]; then say "SKIP $2: needs ~$1 s, $(left) s left in this call"; return 1; fi
}
run() {  # run NAME CMD...: a logged, timed command bounded by the time left; its output goes to the log too
  local name=$1; shift
  local limit=$(( $(left) - 45 ))
  [ "$limit" -gt 10 ] || { say "SKIP $name: no time left"; return 1; }
  say "BEGIN $name: $*"
  if [ $DRY = 1 ]; then say "(dry run)"; return 0; fi
  local t=$SECONDS
  timeout -s INT -k 20 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "END $name: rc=$rc in $((SECONDS - t)) s"
  return "$rc"
}

orchestrate() { "$PY" -m orchestrator.cli "$@"; }  # a function: not for `run` (timeout starts programs only)

stage_unpack() {
  say "unpack (scripts/device/unpack.sh)"
  # shellcheck source=unpack.sh
  source "$HERE/unpack.sh" > >(tee -a "$LOG") 2>&1  # in this shell: its exports stay
  sleep 0.2
  if [ $DRY = 0 ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv 2>&1 | tee -a "$LOG"
  fi
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$LOG"
}

stage_mps() {  # CUDA MPS (../shared/docs/gpu.md): the daemon outlives the call; processes see the two variables
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mpslog
  [ $DRY = 1 ] && { say "mps (dry run)"; return 0; }
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if [ -e "$CUDA_MPS_PIPE_DIRECTORY/control" ] && echo get_server_list | nvidia-cuda-mps-control >/dev/null 2>&1; then
    say "mps: already running"
  elif ! nvidia-cuda-mps-control -d; then
    mps_off "FAILED to start"; return 0
  fi
  # Never tried on this machine's runtime: a daemon whose server cannot start stalls every CUDA client, so one
  # client must work through it within a minute, else MPS goes and the rest of the call runs without it.
  # orchestrator/mps.py's own probe (the one its MPS start uses): a fresh CUDA process, 60 s at most
  if "$PY" -c 'import os, sys; from orchestrator.mps import cuda_client_fails as f; r = f(dict(os.environ)); print(r or "ok"); sys.exit(bool(r))' >> "$LOG" 2>&1; then
    say "mps: a CUDA client ran through it"
  else
    echo quit | nvidia-cuda-mps-control >/dev/null 2>&1
    mps_off "no CUDA client ran through it within 60 s; stopped"
  fi
}
mps_off() {
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY  # rows record mps: false
  export ORCHESTRATE_MPS=0  # and sweeps do not try it again (orchestrator/mps.py)
  say "mps: $1 (packed runs time-slice the GPU)"
}

stage_loader() {  # issue 3: the gpu loader, >= 1M img/s with augmentation
  fits 40 loader || return 0
  run loader-gpu "$PY" -m orchestrator.cli bench-loader --loader gpu --data "$DATA" --device cuda --batch-size 512 --batches 1000
  tail -n 20 "$LOG" | grep '^{' | tail -1 | sed 's/^{/{"bench": "loader", "cmd": "gpu b512", /' >> "$BENCH"
}
stage_loader_compare() {  # issue 3: gpu, dali (when its bundle arrived) and torch side by side, 8 CPU workers
  fits 60 loader-compare || return 0
  run loader-compare "$PY" -m orchestrator.cli bench-loader --compare --data "$DATA" --device cuda --batch-size 256 --batches 200 --workers 8
}

bench() { run "$1" "$PY" "$HERE/bench_train.py" --out "$BENCH" "${@:2}"; }
stage_train()      { fits 60 train && bench train --models resnet20,resnet56,resnet110 --steps graph,eager --iters 200 --min-seconds 3; }
stage_compile20()  { fits 90 compile20 && bench compile20 --models resnet20 --steps compile --iters 200 --min-seconds 3; }
stage_compile56()  { fits 150 compile56 && bench compile56 --models resnet56 --steps compile --iters 100 --min-seconds 3; }
stage_compile110() { fits 200 compile110 && bench compile110 --models resnet110 --steps compile --iters 100 --min-seconds 3; }
# torch.compile's fused kernels inside the one-graph step: the lever left for ResNet-110 (issue 8's <= 10 min)
stage_compile_graph20()  { fits 90 compile-graph20 && bench compile-graph20 --models resnet20 --steps compile_graph --iters 200 --min-seconds 3; }
stage_compile_graph110() { fits 200 compile-graph110 && bench compile-graph110 --models resnet110 --steps compile_graph --iters 100 --min-seconds 3; }
stage_fuse() {  # issue 8: ResNet-20 trials horizontally fused (K members in one CUDA graph), one process
  fits 45 fuse || return 0
  bench fuse8 --models resnet20 --steps graph --fuse 8 --iters 100 --min-seconds 3
}
stage_pack() {  # issue 8: aggregate img/s of packed ResNet-20 trials under MPS (run after `mps`)
  fits 90 pack || return 0
  bench pack-graph --models resnet20 --steps graph --procs 4 --iters 500 --min-seconds 4
  fits 45 fuse-pack && bench fuse-pack --models resnet20 --steps graph --fuse 8 --procs 4 --iters 50 --min-seconds 3
  fits 45 pack8 && bench pack-graph8 --models resnet20 --steps graph --procs 8 --iters 500 --min-seconds 4
}
stage_fuse_more() {  # the eager fused row and 16 members
  fits 90 fuse-more || return 0
  bench fuse8-eager --models resnet20 --steps eager --fuse 8 --iters 50 --min-seconds 3
  bench fuse16 --models resnet20 --steps graph --fuse 16 --iters 50 --min-seconds 3
}
gputests() {  # gputests NAME SECONDS PYTEST_K: the CUDA-only paths against eager steps and across a resume
  fits "$2" "$1" || return 0
  # -o addopts: one process; the machine has no pytest-xdist for pyproject's -n 2 (one GPU: nothing to share)
  (cd "$ROOT" && run "$1" "$PY" -m pytest -q -p no:cacheprovider -o "addopts=-ra --strict-markers" tests/test_gpu.py \
     -k "$3")
}
stage_gputests()         { gputests gputests 40 "not compile_graph"; }  # first in bench: ~20 s
stage_gputests_compile() { gputests gputests-compile 60 "compile_graph"; }  # torch.compile: ~40 s
stage_paper20() {  # issue 4: ResNet-20, the paper's full recipe (64k iterations), through `orchestrate sweep`
  fits 180 paper20 || return 0  # 8.2M images at ~64k img/s: 128 s, + Ray's start, the capture, evaluations
  local spec=$STUDY/paper_resnet20.yaml
  "$PY" "$HERE/make_spec.py" --out "$spec" --study "$STUDY" --data "$DATA" --iters 64000 --models resnet20 \
    --seeds 0 --gpus 1 --name paper_resnet20 2>&1 | tee -a "$LOG"
  SPEC=$spec RESERVE=0 stage_sweep
}

stage_spec() {
  say "spec: $SPEC (iters $SWEEP_ITERS, models $SWEEP_MODELS, seeds $SWEEP_SEEDS)"
  "$PY" "$HERE/make_spec.py" --out "$SPEC" --study "$STUDY" --data "$DATA" --iters "$SWEEP_ITERS" \
    --models "$SWEEP_MODELS" --seeds "$SWEEP_SEEDS" --fuse "${SWEEP_FUSE:-1}" ${SPEC_EXTRA:-} 2>&1 | tee -a "$LOG"
  (cd "$STUDY" && orchestrate sweep "$SPEC" --dry-run) 2>&1 | tee -a "$LOG"
}

stage_sweep() {  # runs until the call's deadline less RESERVE s; a later `sweep` resumes from the checkpoints
  [ -f "$SPEC" ] || stage_spec
  local reserve=${RESERVE:-45}
  local limit=$(( $(left) - reserve - 45 ))
  [ "$limit" -gt 60 ] || { say "SKIP sweep: $(left) s left"; return 0; }
  say "BEGIN sweep for at most $limit s (then SIGINT; resumes next call)"
  [ $DRY = 1 ] && { say "(dry run)"; return 0; }
  local t=$SECONDS
  # In a session of its own (setsid): Ray's processes stay in it, so what survives the driver is ended by
  # session id afterwards, never by name (`ray stop` would end every Ray on the machine).
  (cd "$STUDY" && SPEC=$SPEC LIMIT=$limit setsid bash -c 'echo $$ > sweep.sid; exec timeout -s INT -k 30 "$LIMIT" '"$PY"' -m orchestrator.cli sweep "$SPEC"') 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "END sweep: rc=$rc in $((SECONDS - t)) s ($( [ "$rc" = 124 ] && echo 'stopped at the deadline' || echo 'returned'))"
  end_session "$(cat "$STUDY/sweep.sid" 2>/dev/null)"
  (cd "$STUDY" && orchestrate status "$(spec_name)" --tracking-uri "sqlite:///$STUDY/mlruns.db") 2>&1 | tee -a "$LOG"
}
end_session() {  # end_session SID: kill what is left of the processes of that session (by PID)
  [ -n "${1:-}" ] || return 0
  local pids; pids=$(ps -eo pid=,sid= | awk -v s="$1" '$2 == s {print $1}')
  [ -z "$pids" ] && return 0
  say "ending $(echo $pids | wc -w) leftover process(es) of the sweep's session $1"
  kill -TERM $pids 2>/dev/null; sleep 3
  pids=$(ps -eo pid=,sid= | awk -v s="$1" '$2 == s {print $1}'); [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
  return 0
}
spec_name() { "$PY" -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['name'])" "$SPEC"; }

finished_trials() {  # finished trial runs with a val_error, in the sweep's experiment
  "$PY" - "$STUDY/mlruns.db" "$(spec_name)" <<'PY' 2>/dev/null || echo 0
import sys
from mlflow import MlflowClient
from orchestrator.runs import finished_trials
c = MlflowClient(f"sqlite:///{sys.argv[1]}")
e = c.get_experiment_by_name(sys.argv[2])
print(0 if e is None else sum("val_error" in r.data.metrics for r in finished_trials(c, e.experiment_id)))
PY
}

stage_report() {
  fits 30 report || return 0
  [ -f "$SPEC" ] || { say "SKIP report: no sweep here yet"; return 0; }
  (cd "$STUDY" && run report "$PY" -m orchestrator.cli report --sweep "$(spec_name)" \
    --tracking-uri "sqlite:///$STUDY/mlruns.db" --out "$STUDY/reports")
}

stage_ensemble() {
  fits 45 ensemble || return 0
  [ -f "$SPEC" ] || { say "SKIP ensemble: no sweep here yet"; return 0; }
  local n; n=$(finished_trials); local k=$ENSEMBLE_TOP
  [ "$n" -lt "$k" ] && { say "ensemble: only $n finished trials with val_error; --top $n instead of $k"; k=$n; }
  [ "$k" -ge 2 ] || { say "SKIP ensemble: fewer than 2 finished trials"; return 0; }
  (cd "$STUDY" && run ensemble "$PY" -m orchestrator.cli ensemble --top "$k" --sweep "$(spec_name)" \
    --tracking-uri "sqlite:///$STUDY/mlruns.db")
}

stage_collect() {  # one file: the MLflow store, reports, spec, artifacts but weights, Ray's trial logs
  [ $DRY = 1 ] && { say "collect (dry run)"; return 0; }
  local list; list=$(mktemp)
  (cd / && for p in "$STUDY/mlruns.db" "$STUDY/reports" "$STUDY"/*.yaml "$STUDY/mlruns-artifacts" "$STUDY/sweep/ray"; do
     [ -e "$p" ] && echo "${p#/}"; done) > "$list"
  local ray_logs; ray_logs=$(ls -d /tmp/ray/session_2*/logs 2>/dev/null | tail -2)
  tar -C / -czf "$OUT/results.tar.gz" --exclude='*.pt' --exclude='checkpoint_*' -T "$list" \
    $(for d in $ray_logs; do ls "$d"/worker-*.err "$d"/worker-*.out "$d"/raylet.out 2>/dev/null | sed 's#^/##' | head -60; done) \
    2>/dev/null
  if [ "$(stat -c %s "$OUT/results.tar.gz" 2>/dev/null || echo 0)" -gt $((15 * 1024 * 1024)) ]; then
    say "collect: over 15 MiB with Ray's logs; without them"
    tar -C / -czf "$OUT/results.tar.gz" --exclude='*.pt' --exclude='checkpoint_*' -T "$list" 2>/dev/null
  fi
  rm -f "$list"
  say "collect: $OUT: $(cd "$OUT" && ls -la | awk 'NR>1 && $NF!="." && $NF!=".." {print $NF" "$5}' | tr '\n' ' ')"
}

STAGES=()
for a in "$@"; do
  case $a in
    --dry-run) DRY=1 ;;
    bench) STAGES+=(unpack gputests loader train fuse mps pack paper20 compile20 collect) ;;
    compile) STAGES+=(unpack gputests_compile compile20 compile_graph20 compile_graph110 compile56 compile110 fuse_more collect) ;;
    study) RESERVE=${RESERVE:-90}; STAGES+=(unpack mps spec sweep report ensemble collect) ;;
    unpack|mps|loader|loader_compare|train|fuse|fuse_more|pack|paper20|gputests|gputests_compile|compile20|compile56|compile110|\
    compile_graph20|compile_graph110|spec|sweep|report|ensemble|collect) STAGES+=("$a") ;;
    *) echo "run_study.sh: unknown stage $a (see the top of this file)" >&2; exit 2 ;;
  esac
done
[ ${#STAGES[@]} -gt 0 ] || { sed -n 2,27p "$0"; exit 2; }
[ "${STAGES[0]}" = unpack ] || STAGES=(unpack "${STAGES[@]}")
say "stages: ${STAGES[*]}  (budget $CALL_BUDGET s, OUT=$OUT, STUDY=$STUDY)"
for s in "${STAGES[@]}"; do "stage_$s"; done
say "done in $((SECONDS - T0)) s"
