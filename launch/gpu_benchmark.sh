#!/usr/bin/env bash
# The GPU rows of the README's Results: train-step speed and memory of the IDRiD W48 configs (HRDecoder
# in float32 and bfloat16, Efficient-HRDecoder, FCN-LR, FCN-HR) and the eval forward, one process per row
# so each row's device peak is its own. Each finished row is appended as one JSON line to
# OUT_DIR/results.jsonl and its full output to OUT_DIR/log.txt; a row that runs past ROW_TIMEOUT seconds
# is stopped and the next one starts.
#
#   bash launch/gpu_benchmark.sh OUT_DIR [ROW_TIMEOUT] [ROWS]      (PYTHON=... picks the interpreter)
#
# ROWS: b1 (default: batch 1, the per-GPU batch of the paper's 4-GPU runs), b4 (the paper's global batch
# 4 on one GPU: HRDecoder float32/bfloat16, FCN-LR, FCN-HR), smoke (the tiny row alone; any machine),
# speed1 / speed2 (the performance checks, split in two to fit a device call each: the HRDecoder W48 train
# step at batch 1 and 4 in float32 and bfloat16 with XLA's cost analysis (FLOPs and bytes accessed per image,
# against the step time: memory- or compute-bound); the same step with -nvptx-allow-ftz-atomics (the control
# for jaxlib's scatter-add regression: nothing should change, the step has no scatter) and with command
# buffers off; the input pipeline on 8 cores (taskset), next to the step's demand on this GPU).
set -u
out=${1:?usage: gpu_benchmark.sh OUT_DIR [ROW_TIMEOUT] [b1|b4|smoke|speed1|speed2]}
row_timeout=${2:-150}
rows=${3:-b1}
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# No up-front grab of 75% of the card: the allocator's peak is then what this process used (compile-time
# autotuning included, see docs/benchmark.md).
export XLA_PYTHON_CLIENT_PREALLOCATE=false
"${PYTHON:-python3}" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"

row() {  # name, then benchmark arguments
  local name=$1; shift
  echo "== $name: $*"
  # ROW_PREFIX: a command the row runs under (e.g. "taskset -c 0-7"), unset for most rows.
  timeout "$row_timeout" ${ROW_PREFIX:-} "${PYTHON:-python3}" -m hrdecoder_jax.benchmark "$@" --json "$tmp/$name.json" >"$tmp/$name.txt" 2>"$tmp/$name.err"
  local rc=$?
  { echo "== $name: $* (rc $rc)"; cat "$tmp/$name.txt" "$tmp/$name.err"; } >>"$out/log.txt"
  if [ $rc -eq 0 ]; then
    grep -E "compile_s|median|images_per_s|peak|flops|bytes_accessed|samples_per_s|demand" "$tmp/$name.txt"
    "${PYTHON:-python3}" -c "import json, sys; print(json.dumps(json.load(open(sys.argv[1]))))" \
      "$tmp/$name.json" >>"$out/results.jsonl"
  else
    echo "rc $rc"; tail -5 "$tmp/$name.err"
  fi
  return $rc
}

# A seconds-long smoke row first: a broken environment stops here instead of in every row.
row tiny        --config configs/tiny.py --what train --repeats 2 || exit 1
[ "$rows" = smoke ] && exit 0
train_row() {  # name, config, extra benchmark arguments: the train step's time and memory plan
  local name=$1 config=$2; shift 2
  row "$name" --config "$config" --what train,memory_train --repeats 5 "$@"
}
speed_row() {  # name, batch, dtype, then extra benchmark arguments
  local name=$1 batch=$2 dtype=$3; shift 3
  row "$name" --config configs/idrid.py --what train,memory_train,flops_train --repeats 5 --batch "$batch" \
    --config.model.dtype="$dtype" "$@"
}
if [ "$rows" = speed1 ]; then
  speed_row w48_f32_b1  1 float32
  speed_row w48_bf16_b1 1 bfloat16
  speed_row w48_f32_b4  4 float32
  speed_row w48_bf16_b4 4 bfloat16
  exit 0
fi
if [ "$rows" = speed2 ]; then
  XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_extra_options=-nvptx-allow-ftz-atomics" speed_row w48_f32_b4_ftz 4 float32
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" speed_row w48_f32_b4_nocmdbuf 4 float32
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" speed_row w48_bf16_b4_nocmdbuf 4 bfloat16
  ROW_PREFIX="taskset -c 0-7" row input_8cores --config configs/idrid.py --what input --batch 4 --input_batches 8
  exit 0
fi
if [ "$rows" = b4 ]; then
  train_row idrid_f32_b4   configs/idrid.py --batch 4
  train_row idrid_bf16_b4  configs/idrid.py --batch 4 --config.model.dtype=bfloat16
  train_row idrid_fcnlr_b4 configs/idrid.py:fcn_lr --batch 4
  train_row idrid_fcnhr_b4 configs/idrid.py:fcn_hr --batch 4
  exit 0
fi
train_row idrid_f32   configs/idrid.py
train_row idrid_bf16  configs/idrid.py --config.model.dtype=bfloat16
train_row idrid_fcnlr configs/idrid.py:fcn_lr
train_row idrid_fcnhr configs/idrid.py:fcn_hr
train_row idrid_eff   configs/idrid.py:efficient
row idrid_infer --config configs/idrid.py --what infer,memory_infer --repeats 5
