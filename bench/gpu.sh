#!/usr/bin/env bash
# bench/gpu.sh: one command that proves the GPU path on one GPU, well inside 8 minutes.
#
#   bench/gpu.sh                 # on the GPU machine -> bench/results/{pretrain,perturb,serve_gpu}.json
#   bench/gpu.sh --cpu-dry-run   # here, no GPU: every part at tiny sizes -> bench/out/*_dry.json
#   bench/gpu.sh --fetch-wheels  # here, with network: the wheels the GPU machine lacks -> bench/out/wheels
#
# Parts, in order, each under its own time limit (one hang cannot eat the budget) and
# timed; a failed part is reported and the next one runs:
#   pretrain  bench/pretrain.py: gf-104m and gf-316m (length-grouped, bf16 autocast, SDPA) and
#             their padding-free packed variant (FlexAttention document mask), with the
#             gf-316m fp32-eager baseline in the same run; MFU on real tokens
#   perturb   bench/perturb.py: gf-316m deletion screen, bf16 vs the fp32-eager baseline, and
#             FP8 (model/fp8.py) with its accuracy cost against bf16 on the same cells
#   serve     bench/serve_gpu.py: the Serve replica's tokenize + batched forward without Ray,
#             gf-104m bf16, p50/p99 per request at 1 and 8 callers
#   tests     pytest -m gpu over the files that hold gpu-marked tests (dry run: collection only)
# Then a short table of the headline figures, and each part's status and seconds.
#
# The GPU machine has torch, transformers, peft, numpy, pyarrow (and pytest) but not polars or
# fastapi, which the serving tokenizer and cellfoundry.model import, and it cannot download.
# They travel as wheels in bench/out/wheels (git-ignored: bench/out/ is), fetched here once with
# --fetch-wheels (versions of this venv, CPython 3.12 manylinux x86_64, as that image runs), and
# the PBMC length distribution travels as bench/out/pretrain_lengths.json (written by any run
# of bench/pretrain.py here, e.g. the dry run). Through the device tool:
#   run(command="bash bench/gpu.sh", timeout_s=540,
#       carry=["bench/out/wheels", "bench/out/pretrain_lengths.json"])
# On the GPU the wheels are installed with `pip install --no-index --find-links` into a folder
# of their own (/tmp/cf-site, put on PYTHONPATH), never over the image's packages. Where the
# environment names a folder in $OUT (the device tool's), results and logs are copied there.
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DRY=0
FETCH=0
for arg in "$@"; do
  case "$arg" in
    --cpu-dry-run) DRY=1 ;;
    --fetch-wheels) FETCH=1 ;;
    -h | --help) sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

# The project venv here; the image's python3 on the GPU machine (it holds torch).
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
WHEELS=bench/out/wheels
LENGTHS=bench/out/pretrain_lengths.json
LOGS=bench/out/gpu
# What the GPU image lacks for the serving tokenizer and cellfoundry.model (polars, fastapi)
# and their own needs that it lacks too; pinned to this venv's versions.
WHEEL_PACKAGES=(polars polars-runtime-32 fastapi starlette pydantic pydantic-core
  annotated-types typing-inspection annotated-doc)

if ((FETCH)); then
  mkdir -p "$WHEELS"
  pins=$("$PY" - "${WHEEL_PACKAGES[@]}" <<'EOF'
import importlib.metadata as md, sys
print(" ".join(f"{name}=={md.version(name)}" for name in sys.argv[1:]))
EOF
  ) || { echo "gpu.sh: $PY lacks one of ${WHEEL_PACKAGES[*]}" >&2; exit 1; }
  # shellcheck disable=SC2086  # pins: one word per package
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" $pins || exit 1
  du -sh "$WHEELS"
  ls "$WHEELS"
  exit 0
fi

export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$LOGS"

if ((DRY)); then
  # Sizes come from each script's --cpu-dry-run; a nominal 1 TFLOP/s peak only so that the
  # MFU code path runs (a dry run's figures are never results: they go to bench/out).
  LIMITS=(pretrain=240 perturb=120 serve=90 tests=120)
  PRETRAIN_ARGS=(--cpu-dry-run --peak-tflops 1)
  PERTURB_ARGS=(--cpu-dry-run)
  SERVE_ARGS=(--cpu-dry-run)
else
  if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu.sh: no CUDA device visible; on a CPU use --cpu-dry-run" >&2
    exit 2
  fi
  # Sized for one H100/H200: about 4 minutes expected, at most 7 with every limit hit.
  LIMITS=(pretrain=180 perturb=120 serve=60 tests=60)
  PRETRAIN_ARGS=(--steps 30 --warmup 3 --baseline-steps 10 --baseline-warmup 2)
  PERTURB_ARGS=(--perturbations 256)
  SERVE_ARGS=()
  if [[ -d "$WHEELS" ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    SITE=/tmp/cf-site
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-compile \
      --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl ||
      { echo "gpu.sh: installing $WHEELS failed" >&2; exit 1; }
    export PYTHONPATH="$PYTHONPATH:$SITE"  # after platform/, after nothing of the image
  else
    echo "gpu.sh: warning: no $WHEELS (run bench/gpu.sh --fetch-wheels here and carry it):" \
      "the serve part and most gpu tests need polars and fastapi" >&2
  fi
  [[ -f "$LENGTHS" ]] || echo "gpu.sh: warning: no $LENGTHS (carry it): pretrain will stop" >&2
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
fi

limit() { # limit PART: that part's seconds
  local kv
  for kv in "${LIMITS[@]}"; do [[ "${kv%%=*}" == "$1" ]] && echo "${kv#*=}"; done
}

declare -A STATUS SECONDS_OF
PARTS=()
part() { # part NAME COMMAND...: run under the part's limit, log to $LOGS/NAME.log, time it
  local name=$1 rc start
  shift
  PARTS+=("$name")
  echo
  echo "=== $name (limit $(limit "$name") s): $*"
  start=$(date +%s.%N)
  timeout --kill-after=15 "$(limit "$name")" "$@" 2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  SECONDS_OF[$name]=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  case $rc in
    0) STATUS[$name]=ok ;;
    124 | 137) STATUS[$name]="timed out" ;;
    *) STATUS[$name]="failed (rc $rc)" ;;
  esac
  echo "=== $name: ${STATUS[$name]} in ${SECONDS_OF[$name]} s"
}

START=$(date +%s)
part pretrain "$PY" bench/pretrain.py "${PRETRAIN_ARGS[@]}"
part perturb "$PY" bench/perturb.py "${PERTURB_ARGS[@]}"
part serve "$PY" bench/serve_gpu.py "${SERVE_ARGS[@]}"

mapfile -t GPU_TESTS < <(grep -rlE "pytest\.mark\.gpu\b" tests --include='test_*.py' | sort)
if ! "$PY" -c 'import pytest' 2>/dev/null; then
  PARTS+=(tests)
  STATUS[tests]="not run (no pytest)"
  SECONDS_OF[tests]=0
elif ((${#GPU_TESTS[@]} == 0)); then
  PARTS+=(tests)
  STATUS[tests]="not run (no gpu-marked tests)"
  SECONDS_OF[tests]=0
elif ((DRY)); then
  # collection only: the gpu tests skip without CUDA, and some build Ray corpora first
  part tests "$PY" -m pytest -q -p no:cacheprovider -m gpu --collect-only "${GPU_TESTS[@]}"
else
  # files whose imports the image cannot satisfy (ray, anndata) are reported, the rest run
  part tests "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs \
    --continue-on-collection-errors "${GPU_TESTS[@]}"
fi

"$PY" bench/_gpu_summary.py $((DRY ? 1 : 0)) "$START"
SUMMARY_RC=$?
echo
echo "part      status                        seconds"
for name in "${PARTS[@]}"; do
  printf '%-9s %-29s %7s\n' "$name" "${STATUS[$name]}" "${SECONDS_OF[$name]}"
done
echo "total: $(($(date +%s) - START)) s"

if ((!DRY)) && [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then # the device tool's output folder
  cp bench/results/{pretrain,perturb,serve_gpu}.json "$LOGS"/*.log "$OUT"/ 2>/dev/null
fi
for name in "${PARTS[@]}"; do
  [[ "${STATUS[$name]}" == ok || "${STATUS[$name]}" == "not run"* ]] || exit 1
done
exit $SUMMARY_RC
