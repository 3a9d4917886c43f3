#!/usr/bin/env bash
# Every GPU check of docs/engine.md ("On a GPU"), prepared here and run on a lent GPU machine in
# as few calls as its limits allow (64 MiB carried per call, nothing to download there).
#
#   bash scripts/gpu_check.sh prepare     here: wheels + exported bundles -> .gpu_carry/piece-NN
#   bash scripts/gpu_check.sh receive     there, once per piece but the last (carry that piece)
#   bash scripts/gpu_check.sh run         there, carrying the last piece: unpack, install,
#                                         pytest -m gpu, the benchmark, one table in $OUT
#   bash scripts/gpu_check.sh graphs      there, right after run (machine still warm): fp16 again
#                                         with CUDA graphs, rows added to the table
#   bash scripts/gpu_check.sh rehearse    here: receive + run on the CPU with a short benchmark,
#                                         the cp312 wheels installed for the GPU's Python as a test
#
# The GPU machine's python3 (3.12) has PyTorch, onnx, numba, OpenCV, scikit-image, pytest and CPU
# onnxruntime; it lacks onnxruntime-gpu (a 256 MB wheel, hence the pieces) and pydantic(-settings),
# which travel as wheels. onnxruntime-gpu 1.31.1 is built for CUDA 13; its cuda/cudnn extras
# (nvidia-cuda-runtime 13, nvidia-cudnn-cu13 9) are in that image already, found through
# LD_LIBRARY_PATH below. Bundles are exported here (random-init SegFormer-B0: ADE20K for whole mode,
# Cityscapes for slide, fp32 and fp16) so that the GPU's different torch never exports.
set -euo pipefail
cd "$(dirname "$0")/.."

CARRY=.gpu_carry                       # ignored (.gitignore); named in each call's `carry`
PIECE_SIZE=${PIECE_SIZE:-55M}          # + the working tree (~2 MB) stays under 64 MiB a call
STORE=${GPU_CHECK_STORE:-/tmp/gpu_check}  # there: survives between calls while the machine is warm
MODEL=segformer-b0
WHEELS=(
  onnxruntime-gpu==1.31.1 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 pydantic-settings==2.16.3 python-dotenv==1.2.4
)
GPU_PYTHON_TAGS=(
  --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
)
GPU_TESTS=(tests/unit/test_engine_serving.py tests/unit/test_cuda_graphs.py
           tests/unit/test_device_postprocess.py)

prepare() {
  local payload=$CARRY/payload
  rm -f "$CARRY"/piece-* "$CARRY"/payload.tar*
  mkdir -p "$payload/wheels"
  .venv/bin/python -m pip download -q --no-deps "${GPU_PYTHON_TAGS[@]}" -d "$payload/wheels" \
    "${WHEELS[@]}"
  for precision in fp32 fp16; do
    for dataset in ade20k cityscapes; do
      local name=$MODEL
      [ "$dataset" = ade20k ] || name=$MODEL-$dataset
      local out=$payload/bundles/$precision/$name
      [ -f "$out/segserve.json" ] && continue
      echo "exporting $name ($precision)"
      PYTHONPATH=. .venv/bin/python -c "
from pathlib import Path
from export import export_bundle
export_bundle('$MODEL', Path('$out'), random_init=True, dataset='$dataset',
              precision='$precision', skip_verify=True)"
    done
  done
  tar -cf "$CARRY/payload.tar" -C "$CARRY" payload
  (cd "$CARRY" && sha256sum payload.tar > payload.tar.sha256)
  split -b "$PIECE_SIZE" -d "$CARRY/payload.tar" "$CARRY/piece-"
  rm "$CARRY/payload.tar"
  local pieces=("$CARRY"/piece-*)
  echo "$(du -sh "$payload" | cut -f1) payload in ${#pieces[@]} pieces. Device calls, back to back:"
  local last=${pieces[-1]}
  for piece in "${pieces[@]}"; do
    [ "$piece" = "$last" ] && break
    echo "  run(command='bash scripts/gpu_check.sh receive', carry=['$piece'])"
  done
  echo "  run(command='bash scripts/gpu_check.sh run', carry=['$last', '$CARRY/payload.tar.sha256'],"
  echo "      timeout_s=600)"
}

gpu_environment() {
  export PYTHONPATH=$STORE/site:$PWD PYTHONUNBUFFERED=1
  # CUDA 13 and cuDNN 9 from the image's nvidia-* wheels, for onnxruntime's CUDA provider.
  local nvidia
  nvidia=$(python3 -c 'import site; print(site.getsitepackages()[0])')/nvidia
  LD_LIBRARY_PATH=$(ls -d "$nvidia"/*/lib 2>/dev/null | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export LD_LIBRARY_PATH
}

graphs() {  # after run, on the same warm machine: fp16 with captured CUDA graphs
  local out=${OUT:-$STORE/out}
  mkdir -p "$out"
  gpu_environment
  set -o pipefail
  python3 benchmarks/bench_engine.py --device cuda --precision fp16 --cuda-graphs \
    --models "$MODEL" --sections postprocess --repository "$STORE/payload/bundles/fp16" \
    --batch-sizes 1 8 32 --repeats 3 2>&1 | tee "$out/bench-fp16-graphs.txt"
  sed -n '/^## Engine against/,$p' "$out/bench-fp16-graphs.txt" | grep "^| $MODEL" \
    | tee "$out/gpu_check-graphs.md"
}

receive() {
  mkdir -p "$STORE"
  cp "$CARRY"/piece-* "$STORE"/
  [ -f "$CARRY/payload.tar.sha256" ] && cp "$CARRY/payload.tar.sha256" "$STORE"/
  ls -l "$STORE"
}

run() {  # run [cpu]: "cpu" is the rehearsal (no CUDA, short benchmark)
  local device=${1:-cuda}
  local out=${OUT:-$STORE/out}
  mkdir -p "$out"
  receive
  (cd "$STORE" && cat piece-* > payload.tar && sha256sum -c payload.tar.sha256 && tar -xf payload.tar)
  local payload=$STORE/payload python site=$STORE/site
  rm -rf "$site"
  if [ "$device" = cuda ]; then
    python=python3
    $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
      "$payload"/wheels/*.whl
    gpu_environment
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
  else
    python=.venv/bin/python
    # The same wheels, installed for the GPU's Python 3.12 (cannot be imported here): proves the
    # set is complete and installable offline; this rehearsal then uses the local environment.
    $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
      "${GPU_PYTHON_TAGS[@]}" "$payload"/wheels/*.whl
    ls "$site" | grep -E '^(onnxruntime|pydantic|pydantic_core|pydantic_settings|dotenv)$'
    export PYTHONPATH=$PWD
  fi
  export PYTHONUNBUFFERED=1
  $python - <<EOF | tee "$out/providers.txt"
import onnxruntime as ort
providers = ort.get_available_providers()
print("onnxruntime", ort.__version__, providers)
if "$device" == "cuda":
    assert "CUDAExecutionProvider" in providers, "onnxruntime-gpu did not load its CUDA provider"
EOF
  set -o pipefail
  $python -m pytest -q -m gpu -p no:cacheprovider "${GPU_TESTS[@]}" 2>&1 | tee "$out/pytest-gpu.txt" \
    || echo "pytest -m gpu FAILED" | tee -a "$out/pytest-gpu.txt"
  local precisions=(fp32 fp16) bench_args=(--batch-sizes 1 8 32 --repeats 3)
  if [ "$device" = cpu ]; then
    precisions=(fp32) bench_args=(--batch-sizes 1 --repeats 1)
  fi
  for precision in "${precisions[@]}"; do
    $python benchmarks/bench_engine.py --device "$device" --precision "$precision" \
      --models "$MODEL" --sections postprocess --repository "$payload/bundles/$precision" \
      "${bench_args[@]}" 2>&1 | tee "$out/bench-$precision.txt"
  done
  {
    echo "## Engine against PyTorch eager (images/s), $(head -1 "$out/gpu.txt" 2>/dev/null || echo "$device")"
    echo
    grep -m1 -h '^| bundle |' "$out"/bench-*.txt
    grep -m1 -h '^| --- |' "$out"/bench-*.txt
    for bench in "$out"/bench-*.txt; do  # the rows of each run's final table
      sed -n '/^## Engine against/,$p' "$bench" | grep "^| $MODEL"
    done
  } > "$out/gpu_check.md"
  cat "$out/gpu_check.md"
}

case "${1:-}" in
  prepare) prepare ;;
  receive) receive ;;
  run) run cuda ;;
  graphs) graphs ;;
  rehearse)
    STORE=$(mktemp -d)
    OUT=$STORE/out run cpu
    rm -rf "$STORE"/piece-* "$STORE"/payload* "$STORE"/site
    echo "rehearsal passed; its files are in $STORE/out" ;;
  *) echo "usage: $0 prepare|receive|run|graphs|rehearse" >&2; exit 2 ;;
esac
