#!/usr/bin/env bash
# The GPU work that is still open, as unattended commands for a short lease of one NVIDIA
# GPU. Each part is meant to fit one 10-minute command; neither has run on a GPU yet. The
# sizes come from earlier GPU runs (TABLE.md: 40-epoch small runs took 3m21s two at a time
# on an H100, 10-12 min seven at a time on an H200; README: the GPU benchmark took 116 s).
#
#   bash experiments/gpu_session.sh checks OUT_DIR   # issue 3
#   bash experiments/gpu_session.sh runs OUT_DIR     # issue 5
#
# checks: the cuDNN LSTM test against the scan; the README's GPU benchmark with TF32 off
#   in both libraries (--fp32_matmuls=strict), then the same with cuDNN's LSTM kernel on
#   our side; then the per-block profile of large,real at batch 20 (the one fp32 row
#   under 1.0x PyTorch).
# runs: four PTB small runs at once, 40 epochs each, all three dropouts at 0.2 (where the
#   chosen AL, RE + bias and REAL + bias ran on the CPU, TABLE.md note 13): seeds 2 and 3 of
#   the chosen AL (gamma 3, the row that misses), and seed 2 of RE + bias and of
#   REAL + bias (the CPU trained seeds 0-1; its REAL + bias seed 2 stopped after 3 epochs,
#   and a finished run's JSON replaces that partial one); then the finished runs' JSON
#   files in OUT_DIR/results.tgz and every run's metrics and logs in
#   OUT_DIR/metrics.tgz;
#   `python -m experiments.reproduce --train=false` on the unpacked JSON files beside the
#   committed ones rewrites TABLE.md and SWEEP.md.
#
# Needs: a Python with the package's dependencies (and torch for checks), TIED_LM_DATA_DIR
# pointing at the corpora. Run directories go to RUN_ROOT (default /tmp/tied_lm_runs):
# outside the repository, so that nothing of a run is left in the working copy. Every step
# writes into OUT_DIR as it finishes, so a command cut short keeps what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."

fail() { echo "error: $*" >&2; exit 2; }
[[ $# -eq 2 ]] || fail "usage: gpu_session.sh checks|runs OUT_DIR"
part="$1"
out="$2"
[[ "$part" == checks || "$part" == runs ]] || fail "unknown part $part: use checks or runs"
[[ -n "${TIED_LM_DATA_DIR:-}" ]] \
  || fail "set TIED_LM_DATA_DIR to the directory holding the corpora"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
run_root="${RUN_ROOT:-/tmp/tied_lm_runs}"
# Extra flags for every benchmark and reproduce command, e.g. for a dry run on a CPU:
# EXTRA_FLAGS="--set=num_epochs=1 --set=max_steps_per_epoch=3" (runs), or
# EXTRA_FLAGS="--repeats=1 --steps_per_repeat=1 --warmup=0" (checks).
read -r -a extra <<< "${EXTRA_FLAGS:-}"
gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 \
  | tr -cd 'A-Za-z0-9' | tr 'A-Z' 'a-z')"
gpu="${gpu#nvidia}"
gpu="${gpu:-cpu}"

step() {  # step NAME COMMAND...: run one step, its output to OUT_DIR/NAME.log
  local name="$1"; shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc after $((SECONDS - start)) s"
  tail -n 25 "$out/$name.log"
  # 124: `timeout` stopped a run at RUNS_SECONDS, as planned. A failure goes in a file:
  # the runs part starts steps in the background, whose variables stay there.
  [[ $rc -eq 0 || $rc -eq 124 ]] || echo "$name (exit $rc)" >> "$out/failed_steps"
}
rm -f "$out/failed_steps"

case "$part" in
  checks)
    step cudnn_test python -m pytest -q -rs tests/test_models.py -k cudnn
    bench=(python -m experiments.benchmark --compare=torch --fp32_matmuls=strict
           --configs=configs/ptb.py:medium,real --configs=configs/ptb.py:large,real
           --batch_sizes=20,128 "${extra[@]}")
    step benchmark_strict "${bench[@]}" --output="$out/benchmark_gpu_${gpu}_strict.json"
    step benchmark_cudnn "${bench[@]}" --set=model.lstm_implementation=cudnn \
      --output="$out/benchmark_gpu_${gpu}_strict_cudnn.json"
    step profile_large python -m experiments.profile_step --compare=torch --fp32_matmuls=strict \
      --configs=configs/ptb.py:large,real --batch_sizes=20 \
      "${extra[@]}" --output="$out/profile_gpu_${gpu}_large_strict.json"
    ;;
  runs)
    results="$run_root/results"
    mkdir -p "$results"
    reproduce=(python -m experiments.reproduce --root="$run_root" --results_dir="$results"
               --sizes=small --set=model.unroll=5 "${extra[@]}")
    # Four runs share the GPU, each with a fifth of its memory. Training stops after
    # RUNS_SECONDS (default 540, for a 10-minute command); a run stopped early keeps its
    # curve so far in metrics.tgz, and only finished runs get a JSON in results.tgz.
    export XLA_PYTHON_CLIENT_MEM_FRACTION=0.2
    budget=(timeout --kill-after=20 "${RUNS_SECONDS:-540}")
    dropout() { echo --sweep=model.{input,hidden,output}_dropout="$1"; }
    # --sweep=seed last, so that TABLE.md counts each seed towards its settings' mean.
    step al_gamma3_dropout0.2_seeds2-3 "${budget[@]}" "${reproduce[@]}" --variants=al \
      --sweep=loss.gamma=3 $(dropout 0.2) --sweep=seed=2,3 --parallel=2 &
    step re_bias_dropout0.2_seed2 "${budget[@]}" "${reproduce[@]}" --variants=re \
      --sweep=model.output_bias=True $(dropout 0.2) --sweep=seed=2 &
    step real_bias_dropout0.2_seed2 "${budget[@]}" "${reproduce[@]}" --variants=real \
      --sweep=model.output_bias=True $(dropout 0.2) --sweep=seed=2 &
    wait
    # Each invocation rewrote SWEEP.md with its own run; one report over all of them.
    step report python -m experiments.reproduce --root="$run_root" --results_dir="$results" \
      --train=false
    tar -czf "$out/results.tgz" -C "$results" .
    tar -czf "$out/metrics.tgz" -C "$run_root" --exclude=./results --exclude=checkpoints \
      --exclude=tensorboard .
    ;;
esac
# An unattended lease must not read as a success when a step failed.
if [[ -s "$out/failed_steps" ]]; then
  echo "error: $(wc -l < "$out/failed_steps") step(s) failed: $(paste -sd, "$out/failed_steps")" >&2
  exit 1
fi
