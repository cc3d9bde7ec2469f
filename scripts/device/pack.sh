#!/usr/bin/env bash
# Fill .device/ (git-ignored) with what a GPU-machine run needs, in carry-sized folders .device/p1, p2, ...
# Run HERE (the CPU machine), from anywhere:  bash scripts/device/pack.sh [--dali] [--part-mb 48]
#
#   p1  the CIFAR JPEG archive + every small wheel (pydantic, MLflow client + sqlite store, ray's deps)
#   p2  ray's wheel, piece 1      p3  ray's wheel, piece 2      (split: the wheel is ~76 MiB)
#   p4... (--dali only) NVIDIA DALI + nvImageCodec/nvJPEG wheels, in pieces
# Each folder stays under --part-mb MB on disk (du -s and du -s --apparent-size), so that a `run` call that
# carries it stays under the tool's 64 MiB (the working tree is ~0.5 MB). Wheels are cached in .device/cache.
# Prints the parts with sizes and the carry list of each `run` call (see docs/gpu-runbook.md).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/scripts/device
DEV=${DEV:-$ROOT/.device}           # (tests: another folder)
PYVER=${PYVER:-3.12}                 # the GPU machine's python3 (tests: 3.11)
DATA=${DATA:-$ROOT/../shared/datasets/cifar10-jpeg.tar.gz}
PY=${PY:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
DALI=0; PART_MB=48
while [ $# -gt 0 ]; do
  case $1 in
    --dali) DALI=1 ;;
    --part-mb) PART_MB=$2; shift ;;
    -h|--help) sed -n 2,12p "$0"; exit 0 ;;
    *) echo "pack.sh: unknown argument $1" >&2; exit 2 ;;
  esac; shift
done
LIMIT=$((PART_MB * 1000 * 1000))      # bytes, decimal MB: < 50 MB as the runbook asks
PIECE=$((LIMIT - 2 * 1000 * 1000))     # a split piece leaves room for the folder's MANIFEST and block rounding

[ -f "$DATA" ] || { echo "pack.sh: no data archive at $DATA" >&2; exit 1; }
[ "$DEV" != "$ROOT/.device" ] || git -C "$ROOT" check-ignore -q .device/x || { echo "pack.sh: .device/ is not git-ignored; add /.device/ to .gitignore" >&2; exit 1; }

download() {  # $1: requirements file -> wheels in $DEV/cache (kept between runs: a second pack is offline)
  grep -vE '^\s*(#|$)' "$1" | while read -r req; do
    name=${req%%==*}; ver=${req#*==}
    norm=$(echo "$name" | tr 'A-Z-.' 'a-z__')
    if ls "$DEV/cache" 2>/dev/null | grep -qiE "^${norm}-${ver//./\\.}-"; then continue; fi
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64 \
      --platform manylinux_2_31_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_35_x86_64 \
      -d "$DEV/cache" "$req" 2>&1 | grep -v '^WARNING: Location' || true
    ls "$DEV/cache" | grep -qiE "^${norm}-${ver//./\\.}-" || { echo "pack.sh: could not download $req" >&2; exit 1; }
  done
}
wheel_of() {  # requirement -> cached wheel path
  local name=${1%%==*} ver=${1#*==}; local norm; norm=$(echo "$name" | tr 'A-Z-.' 'a-z__')
  ls "$DEV/cache"/* | grep -iE "/${norm}-${ver//./\\.}-[^/]*\.whl$" | head -1
}
disk()  { du -s -B1 "$1" | cut -f1; }
appar() { du -s -B1 --apparent-size "$1" | cut -f1; }

mkdir -p "$DEV/cache"
echo "== downloading wheels (Python $PYVER, manylinux x86_64) into $DEV/cache"
download "$HERE/wheels.txt"
[ $DALI = 1 ] && download "$HERE/dali-wheels.txt"

rm -rf "$DEV"/p[0-9]*
PLAN=$DEV/p1/PLAN
mkdir -p "$DEV/p1/wheels"
cp "$DATA" "$DEV/p1/cifar10-jpeg.tar.gz"
: > "$DEV/p1/pieces.txt"

# Small wheels go whole into p1; a wheel too big for p1's space is split into pieces, one part folder each.
n=1
split_wheel() {  # $1: wheel path, $2: label; pieces go to p(n+1), p(n+2), ...; records "name sha256 count"
  local whl=$1 base; base=$(basename "$1")
  local sum; sum=$(sha256sum "$whl" | cut -d' ' -f1)
  local tmp; tmp=$(mktemp -d)
  split -b "$PIECE" -d -a 2 "$whl" "$tmp/$base.part-"
  local count; count=$(ls "$tmp" | wc -l)
  echo "$base $sum $count" >> "$DEV/p1/pieces.txt"
  for piece in "$tmp"/*; do
    n=$((n + 1)); mkdir -p "$DEV/p$n/pieces"; mv "$piece" "$DEV/p$n/pieces/"
  done
  rmdir "$tmp"
}
big=()
while read -r req; do
  whl=$(wheel_of "$req")
  [ -n "$whl" ] || { echo "pack.sh: $req missing from cache" >&2; exit 1; }
  if [ "$(stat -c %s "$whl")" -gt $((8 * 1000 * 1000)) ]; then big+=("$whl"); else cp "$whl" "$DEV/p1/wheels/"; fi
done < <(grep -vE '^\s*(#|$)' "$HERE/wheels.txt")
for whl in "${big[@]}"; do split_wheel "$whl"; done
if [ $DALI = 1 ]; then
  # DALI's wheels: one tar (wheels are zips already; compressing again gains little), split into pieces.
  tmp=$(mktemp -d); list=()
  while read -r req; do whl=$(wheel_of "$req"); [ -n "$whl" ] || { echo "pack.sh: $req missing" >&2; exit 1; }; list+=("$(basename "$whl")"); done \
    < <(grep -vE '^\s*(#|$)' "$HERE/dali-wheels.txt")
  tar -C "$DEV/cache" -cf "$tmp/dali-wheels.tar" "${list[@]}"
  split_wheel "$tmp/dali-wheels.tar"; rm -rf "$tmp"
fi
n_parts=$n

# Manifests: every file of a part with its sha256 (unpack.sh verifies what arrived).
for d in "$DEV"/p[0-9]*; do (cd "$d" && find . -type f ! -name MANIFEST -printf '%P\n' | sort | xargs sha256sum > MANIFEST); done
echo "$n_parts" > "$DEV/p1/NPARTS"; (cd "$DEV/p1" && sha256sum NPARTS pieces.txt > MANIFEST.p1 && find . -type f ! -name MANIFEST ! -name MANIFEST.p1 -printf '%P\n' | sort | xargs sha256sum > MANIFEST && rm MANIFEST.p1)

echo
printf '%-6s %12s %12s  %s\n' part "du -s (B)" "apparent (B)" contents
bad=0
for i in $(seq 1 "$n_parts"); do
  d=$DEV/p$i; a=$(appar "$d"); k=$(disk "$d")
  what=$(cd "$d" && find . -type f ! -name MANIFEST ! -name NPARTS ! -name pieces.txt -printf '%f\n' | sed 's/-[0-9].*\.whl$//; s/\.whl\.part-/ piece /; s/\.tar\.part-/ piece /' | sort | tr '\n' ' ')
  printf '%-6s %12s %12s  %s\n' "p$i" "$k" "$a" "$(echo "$what" | cut -c1-150)"
  { [ "$a" -lt "$LIMIT" ] && [ "$k" -lt "$LIMIT" ]; } || { echo "pack.sh: p$i is over $PART_MB MB" >&2; bad=1; }
done
tree=$(cd "$ROOT" && git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "working tree that travels with every call: $tree B"
echo
echo "== run calls, in this order, each right after the previous one (the machine stays warm 30 s):"
echo "   call 1: carry [\".device/p1\"]   command: bash scripts/device/run_study.sh call1"
echo "   call 2: carry [\".device/p2\"]   command: bash scripts/device/run_study.sh call2"
echo "   call 3: carry [\".device/p3\"]   command: bash scripts/device/run_study.sh call3"
echo "   call 4: carry []               command: bash scripts/device/run_study.sh call4"
if [ "$n_parts" -gt 3 ]; then
  echo "   DALI (--dali), after call 1, before call 3; each: bash scripts/device/run_study.sh unpack"
  for i in $(seq 4 "$n_parts"); do echo "   dali piece call: carry [\".device/p$i\"]"; done
fi
echo "(details and expected minutes: docs/gpu-runbook.md)"
exit $bad
