#!/usr/bin/env bash
# Train DeepSeek-V4 with TorchTitan's Trainer.
#
#   ./run_train.sh --model deepseek_v4                         # debug model, default config
#   ./run_train.sh --model deepseek_v4 --config train_configs/deepseek_v4_flash.toml
#   ./run_train.sh --model deepseek_v4 --training.steps 30     # any --section.key value passes through
#
# Environment (as in TorchTitan's run_train.sh): NGPU (ranks; default: GPU count, or 2 CPU ranks over
# gloo when there is no GPU), LOG_RANK (default 0), CONFIG_FILE, COMM_MODE (fake_backend: one-process
# dry run that prints the FSDP unit plan for NGPU ranks; local_tensor: Titan's own simulated mode),
# TRAIN_FILE (default titan_dsv4.train), TITAN_DSV4_PREFLIGHT (0: no check before the ranks start).
# --debug shows the traceback of a refused job (one message by default).
set -euo pipefail

root="$(cd "$(dirname "$0")" && pwd)"
CONFIG_FILE="${CONFIG_FILE:-$root/train_configs/debug_model.toml}"
model="deepseek_v4"
passthrough=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --model=*) model="${1#--model=}"; shift ;;
    --config) CONFIG_FILE="$2"; shift 2 ;;
    --config=*) CONFIG_FILE="${1#--config=}"; shift ;;
    --debug) export TITAN_DSV4_TRACEBACK=1; shift ;;
    *) passthrough+=("$1"); shift ;;
  esac
done
if [ "$model" != "deepseek_v4" ]; then
  echo "run_train.sh: unknown --model '$model'; this package trains 'deepseek_v4'" >&2
  exit 2
fi
if [ ! -f "$CONFIG_FILE" ]; then
  echo "run_train.sh: config file '$CONFIG_FILE' not found; pick one of: $(ls "$root"/train_configs/*.toml | xargs -n1 basename | tr '\n' ' ')" >&2
  exit 2
fi
CONFIG_FILE="$(cd "$(dirname "$CONFIG_FILE")" && pwd)/$(basename "$CONFIG_FILE")"

source "$root/scripts/env.sh"
cd "$root"  # the configs name repository-relative assets (tokenizer, outputs)

if [ -z "${NGPU:-}" ]; then
  NGPU="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
  [ "$NGPU" -gt 0 ] || NGPU=2
fi
LOG_RANK="${LOG_RANK:-0}"
TRAIN_FILE="${TRAIN_FILE:-titan_dsv4.train}"

if [ "${COMM_MODE:-}" = "fake_backend" ]; then
  # Dry run: meshes, meta model and parallelize_deepseek_v4 for NGPU fake ranks; prints the FSDP unit plan.
  NGPU="$NGPU" LOCAL_RANK=0 exec "$PYTHON" -m titan_dsv4.dry_run --job.config_file "$CONFIG_FILE" \
    ${passthrough[@]+"${passthrough[@]}"}
fi
if [ -n "${COMM_MODE:-}" ]; then
  NGPU="$NGPU" LOCAL_RANK=0 exec "$PYTHON" -m "$TRAIN_FILE" --job.config_file "$CONFIG_FILE" \
    --comm.mode="$COMM_MODE" --training.steps=1 ${passthrough[@]+"${passthrough[@]}"}
fi

# Refusals before any rank starts: one message, exit 2 (the ranks check again; see titan_dsv4/preflight.py).
# TITAN_DSV4_PREFLIGHT=0 skips it (about 4 s of imports): the ranks then refuse, rank 0 printing the message.
if [ "${TITAN_DSV4_PREFLIGHT:-1}" != "0" ]; then
  NGPU="$NGPU" "$PYTHON" -m titan_dsv4.preflight --job.config_file "$CONFIG_FILE" ${passthrough[@]+"${passthrough[@]}"}
fi

exec "$PYTHON" -m torch.distributed.run --nproc_per_node="$NGPU" --rdzv_backend c10d --rdzv_endpoint=localhost:0 \
  --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
  -m "$TRAIN_FILE" --job.config_file "$CONFIG_FILE" ${passthrough[@]+"${passthrough[@]}"}
