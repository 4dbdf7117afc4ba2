#!/usr/bin/env bash
# Start N jaxsr processes on this machine, joined by jax.distributed over localhost.
#
#   launch/local.sh 2 train --config configs/seesr_train.py:tiny --workdir runs/local
#   DEVICES_PER_PROCESS=4 launch/local.sh 2 train ...    # CPU: 4 host devices each
#
# Each process gets --coordinator localhost:PORT --num-processes N --process-id i; on
# GPUs set CUDA_VISIBLE_DEVICES per process yourself if they share the machine. The
# script waits for all processes and exits with the first non-zero status.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 NUM_PROCESSES jaxsr-subcommand [args...]" >&2
  exit 2
fi
n=$1; shift
port=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("localhost",0)); print(s.getsockname()[1])')}
if [[ -n "${DEVICES_PER_PROCESS:-}" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}"
fi
# The installed console script, else the module with $PYTHON (a source checkout).
if command -v jaxsr >/dev/null 2>&1; then cmd=(jaxsr); else cmd=("${PYTHON:-python3}" -m jaxsr.cli); fi
pids=()
for ((i = 0; i < n; i++)); do
  "${cmd[@]}" "$@" --coordinator "localhost:${port}" --num-processes "$n" --process-id "$i" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || { s=$?; [[ $status -eq 0 ]] && status=$s; }
done
exit $status
