#!/usr/bin/env bash
# Every GPU benchmark in one call on the device machine, for the GPUs it has (1, 2, 4 or 8).
# Usage there (repository root, wheelhouse carried in .whl/):
#   LONGLOOM_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_suite.sh [attention ring linear train offload
#       offload512 longest expandable optpeak tiles kernels storage checkpoint]
# expandable: off at 448K (out of memory with the default allocator) with expandable segments.
# optpeak: the interleaved share-0.5 case, then auto and gpu (each case in a process of its own).
# longest: one step with offload on at 576K, and off at 416K (measured: 384K runs, 448K out of memory).
# tiles: the offload table with the tiled MLP (same model otherwise): compare with the offload part.
# One device call allows 600 s: name one or two parts per call (offload512 and checkpoint take ~5-9 min each).
# Each part appends its table to BENCHMARKS.md (--record) and its log to $OUT (or /tmp); copy
# BENCHMARKS.md back afterwards. Parts run in the order given, each under its own time limit.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
out=${OUT:-/tmp/longloom-gpu-suite}
mkdir -p "$out"
if [ -d .whl ]; then
  T=/tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $T .whl/*.whl 2>/dev/null
  [ -d $T/ray ] || tar xJf .whl/ray-2.60.0-lite.tar.xz -C $T
  export PYTHONPATH=$T:$PWD
fi
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
parts=${*:-attention ring linear train offload checkpoint}
echo "GPUs: $gpus; parts: $parts"
for part in $parts; do
  case $part in
    attention) if [ "$gpus" -gt 1 ]; then cmd="torchrun --nproc-per-node $gpus bench/attention.py --seq 65536 262144 --record"
               else cmd="python3 bench/attention.py --nproc 1 --seq 65536 262144 --record"; fi; limit=300 ;;
    ring)      [ "$gpus" -gt 1 ] || { echo "ring: needs 2+ GPUs"; continue; }
               cmd="torchrun --nproc-per-node $gpus bench/ring.py --seq 65536 262144 --record"; limit=400 ;;
    linear)    counts=""; for n in 1 2 4 8; do [ "$n" -le "$gpus" ] && counts="$counts $n"; done
               if [ "$gpus" -gt 1 ]; then cmd="torchrun --nproc-per-node $gpus bench/linear.py --gpus$counts --seq-per-gpu 65536 524288 --record"
               else cmd="python3 bench/linear.py --parts kernels --seq 8192 65536 --record"; fi; limit=300 ;;
    train)     cmd="python3 bench/train.py --workers $gpus --backend ray --record -- parallel.ulysses=$gpus"; limit=200 ;;
    offload)   cmd="python3 bench/offload.py --layers 8 --seqs 65536,131072 --record"; limit=560 ;;
    offload512) cmd="python3 bench/offload.py --part activations --layers 8 --seqs 524288 --modes 0.5,on,off --iters 1 --act-warmup 0 --record"; limit=590 ;;
    longest)   cmd="python3 bench/offload.py --part activations --layers 8 --seqs 425984 --modes off --iters 1 --act-warmup 0 --record"; limit=200
               echo "== longest (on): 576K"; timeout 300 python3 bench/offload.py --part activations --layers 8 --seqs 589824 --modes on --iters 1 --act-warmup 0 --record > "$out/longest-on.log" 2>&1; tail -n 3 "$out/longest-on.log" ;;
    expandable) cmd="env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 bench/offload.py --part activations --layers 8 --seqs 458752 --modes off --iters 1 --act-warmup 0 --record"; limit=300 ;;
    optpeak)   cmd="python3 bench/offload.py --part optimizer --optimizer-modes half,auto,gpu --record"; limit=300 ;;
    tiles)     cmd="python3 bench/offload.py --part activations --layers 8 --seqs 65536,131072 --modes off,on --set model.mlp_tiles=auto --record"; limit=400 ;;
    kernels)   cmd="python3 bench/attention_kernels.py --record"; limit=200 ;;
    storage)   cmd="python3 bench/storage_write.py --dir /tmp /dev/shm --gib 6 --threads 1 4 8 16 --record"; limit=200 ;;
    checkpoint) cmd="python3 bench/checkpoint.py --dir /tmp/longloom-ckpt --record"; limit=590 ;;
    *) echo "unknown part $part"; continue ;;
  esac
  echo "== $part: $cmd"
  timeout $limit $cmd > "$out/$part.log" 2>&1
  echo "   exit $? ($part), last lines:"; tail -n 15 "$out/$part.log"
done
cp BENCHMARKS.md "$out/" 2>/dev/null
