#!/bin/bash
# A/B of extension builds on the GPU host, in one `run`: each build's .so in turn in
# fla_cuda/_C.abi3.so, ROUNDS alternations (default 2), running for each the command in $AB_CMD
# (default: chunk_gla's and chunk_simple_gla's bench rows at the headline shape, graph replays);
# then, unless AB_NO_COMPARE=1, scripts/ab_outputs.py saves every build's outputs and gradients
# and compares each with the first build's bit for bit.
# AB_OUTPUTS_ARGS: extra arguments of ab_outputs.py save (e.g. "--device cpu --cases 1": a smoke test).
#
#   OUT=dir AB_CMD="python bench/bench.py ..." bash scripts/ab_builds.sh base.so variant.so ...
#
# Carry the .so files, fla_cuda/_build_info.py (without it the ops run the PyTorch path) and,
# for FLA rows, .whl/. Exit status: 1 if some build's values differ from the first's.
set -o pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-out/ab}
ROUNDS=${ROUNDS:-2}
AB_CMD=${AB_CMD:-"python bench/bench.py --ops chunk_gla,chunk_simple_gla --modes fwd,fwdbwd --cuda-graph --no-fla --no-sdpa --no-plot --out \$AB_OUT"}
mkdir -p "$OUT"
[ -f fla_cuda/_build_info.py ] || { echo "fla_cuda/_build_info.py missing: the ops would run the PyTorch path"; exit 2; }
builds=("$@")
[ ${#builds[@]} -ge 1 ] || { echo "usage: OUT=dir bash scripts/ab_builds.sh a.so [b.so ...]"; exit 2; }
cp fla_cuda/_C.abi3.so "$OUT/.orig.so" 2>/dev/null
for r in $(seq 1 "$ROUNDS"); do
  for b in "${builds[@]}"; do
    tag=$(basename "$b" .so)
    cp "$b" fla_cuda/_C.abi3.so
    export AB_OUT="$OUT/${tag}_r$r"
    echo "=== round $r: $tag"
    eval "$AB_CMD" 2>&1 | tee "$OUT/${tag}_r$r.log" | grep -E "^\| (chunk|fused|parallel)|passed|failed|error" | cut -c1-140
  done
done
rc=0
if [ "${AB_NO_COMPARE:-0}" != 1 ]; then
  first=""
  for b in "${builds[@]}"; do
    tag=$(basename "$b" .so)
    cp "$b" fla_cuda/_C.abi3.so
    python scripts/ab_outputs.py save "$OUT/outputs_$tag.pt" ${AB_OUTPUTS_ARGS:-} || rc=1
    if [ -z "$first" ]; then first=$tag; else
      echo "=== values: $tag against $first"
      python scripts/ab_outputs.py compare "$OUT/outputs_$first.pt" "$OUT/outputs_$tag.pt" || rc=1
    fi
  done
fi
[ -f "$OUT/.orig.so" ] && cp "$OUT/.orig.so" fla_cuda/_C.abi3.so && rm -f "$OUT/.orig.so"
exit $rc
