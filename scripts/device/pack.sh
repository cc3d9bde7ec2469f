#!/usr/bin/env bash
# Fill .device/ (git-ignored) with what a GPU-machine run needs, in carry-sized folders .device/p1, p2, ...
# Run HERE (the CPU machine), from anywhere:  bash scripts/device/pack.sh [--dali] [--part-mb 60]
#
#   p1   the CIFAR JPEG archive + core.tar.xz: every Python package the GPU image lacks (pydantic, the MLflow
#        client, Ray Tune; scripts/device/wheels.txt), installed here for the GPU machine's Python and packed
#        with xz -9. Ray goes without its Java jars and its web UI (the sweep starts Ray without a dashboard):
#        that takes Ray from a 79 MB wheel to ~26 MB, so everything the sweep needs arrives in ONE call.
#   p2…  (--dali only) dali.tar.xz, NVIDIA DALI + nvJPEG/nvImageCodec (523 MB of wheels, 974 MB installed,
#        244 MiB as xz), split in pieces: p2-p6, one more call each.
# Each folder stays under --part-mb MB on disk and apparent (du -s), so that a `run` call carrying it stays
# under the tool's 64 MiB with the working tree (~0.6 MB). Wheels are cached in .device/cache/PYVER and built
# bundles in .device/build (rebuilt only when their wheel list or this script changes).
# Prints the parts with their sizes (docs/gpu-runbook.md says which call carries which).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/scripts/device
DEV=${DEV:-$ROOT/.device}           # (tests: another folder)
PYVER=${PYVER:-3.12}                 # the GPU machine's python3 (tests: 3.11, to run what was packed here)
DATA=${DATA:-$ROOT/../shared/datasets/cifar10-jpeg.tar.gz}
CACHE=$DEV/cache/$PYVER
PY=${PY:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
DALI=0; PART_MB=60
while [ $# -gt 0 ]; do
  case $1 in
    --dali) DALI=1 ;;
    --part-mb) PART_MB=$2; shift ;;
    -h|--help) sed -n 2,14p "$0"; exit 0 ;;
    *) echo "pack.sh: unknown argument $1" >&2; exit 2 ;;
  esac; shift
done
LIMIT=$((PART_MB * 1000 * 1000))      # bytes, decimal MB (64 MiB = 67.1 MB is the tool's limit for a call)
PIECE=$((LIMIT - 1000 * 1000))         # a split piece leaves room for the folder's MANIFEST and block rounding
PLATFORMS=(manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64
           manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64 manylinux1_x86_64)
PLATFORM_ARGS=(--python-version "$PYVER" --implementation cp --only-binary=:all: $(printf -- '--platform %s ' "${PLATFORMS[@]}"))
# What the GPU run never loads, dropped from the bundles (paths inside the installed site).
PRUNE=(ray/jars ray/dashboard/client)

[ -f "$DATA" ] || { echo "pack.sh: no data archive at $DATA" >&2; exit 1; }
[ "$DEV" != "$ROOT/.device" ] || git -C "$ROOT" check-ignore -q .device/x || { echo "pack.sh: .device/ is not git-ignored; add /.device/ to .gitignore" >&2; exit 1; }

requirements() { grep -vE '^\s*(#|$)' "$1"; }

download() {  # $1: requirements file -> wheels in $DEV/cache (kept between runs: a second pack is offline)
  local req
  requirements "$1" | while read -r req; do
    [ -n "$(wheel_of "$req")" ] && continue
    "$PY" -m pip download -q --no-deps "${PLATFORM_ARGS[@]}" -d "$CACHE" "$req" 2>&1 | grep -v '^WARNING: Location' || true
    [ -n "$(wheel_of "$req")" ] || { echo "pack.sh: could not download $req" >&2; exit 1; }
  done
}
wheel_of() {  # requirement -> its cached wheel
  local name=${1%%==*} ver=${1#*==}; local norm; norm=$(echo "$name" | tr 'A-Z-.' 'a-z__')
  ls "$CACHE"/*.whl 2>/dev/null | grep -iE "/${norm}-${ver//./\\.}-" | head -1 || true
}

bundle() {  # bundle NAME REQFILE -> $DEV/build/NAME-$PYVER.tar.xz: the wheels installed into one site folder
  local name=$1 reqs=$2 out=$DEV/build/$1-$PYVER.tar.xz
  # rebuilt when what goes into it changes (not when a comment of this script does: DALI's takes ~5 min)
  local key; key=$( (cat "$reqs"; echo "${PRUNE[*]} ${PLATFORM_ARGS[*]}") | sha256sum | cut -c1-16)
  if [ -f "$out" ] && [ "$(cat "$out.key" 2>/dev/null)" = "$key" ]; then echo "$out"; return; fi
  local tmp wheels=(); tmp=$(mktemp -d)
  while read -r req; do wheels+=("$(wheel_of "$req")"); done < <(requirements "$reqs")
  "$PY" -m pip install -q --no-deps --no-index --no-compile --target "$tmp/site" "${PLATFORM_ARGS[@]}" \
    "${wheels[@]}" 2> >(grep -v '^WARNING: Location' >&2)
  (cd "$tmp/site" && rm -rf "${PRUNE[@]}" bin)  # bin/: entry points with this machine's interpreter in them
  echo "pack.sh: $name: $(du -sm "$tmp/site" | cut -f1) MB installed, packing with xz -9 (here: core ~1 min, dali ~4.5)" >&2
  mkdir -p "$DEV/build"
  tar -C "$tmp/site" -cf - . | xz -9 -T0 > "$out.tmp" && mv "$out.tmp" "$out" && echo "$key" > "$out.key"
  rm -rf "$tmp"
  echo "$out"
}

place() {  # place FILE: whole into p1 if it fits beside what is there, else split into new part folders
  local file=$1 base; base=$(basename "$1")
  local sum; sum=$(sha256sum "$file" | cut -d' ' -f1)
  local used; used=$(du -s -B1 --apparent-size "$DEV/p1" | cut -f1)
  if [ $((used + $(stat -c %s "$file"))) -lt "$PIECE" ]; then
    cp "$file" "$DEV/p1/$base"; echo "$base $sum 0" >> "$DEV/p1/BUNDLES"; return
  fi
  local tmp; tmp=$(mktemp -d)
  split -b "$PIECE" -d -a 2 "$file" "$tmp/$base.part-"
  echo "$base $sum $(ls "$tmp" | wc -l)" >> "$DEV/p1/BUNDLES"
  for piece in "$tmp"/*; do n=$((n + 1)); mkdir -p "$DEV/p$n"; mv "$piece" "$DEV/p$n/"; done
  rmdir "$tmp"
}

mkdir -p "$CACHE"
echo "== wheels for Python $PYVER (manylinux x86_64) into $CACHE"
download "$HERE/wheels.txt"
[ $DALI = 1 ] && download "$HERE/dali-wheels.txt"
core=$(bundle core "$HERE/wheels.txt")
[ $DALI = 1 ] && dali=$(bundle dali "$HERE/dali-wheels.txt")

rm -rf "$DEV"/p[0-9]*
mkdir -p "$DEV/p1"; : > "$DEV/p1/BUNDLES"; n=1
cp "$DATA" "$DEV/p1/cifar10-jpeg.tar.gz"
place "$core"
[ $DALI = 1 ] && place "$dali"
echo "$n" > "$DEV/p1/NPARTS"
# Manifests: every file of a part with its sha256 (unpack.sh verifies what arrived).
for d in "$DEV"/p[0-9]*; do (cd "$d" && find . -type f ! -name MANIFEST -printf '%P\n' | sort | xargs sha256sum > MANIFEST); done

echo
printf '%-6s %12s %12s  %s\n' part "du -s (B)" "apparent (B)" contents
bad=0
for i in $(seq 1 "$n"); do
  d=$DEV/p$i; a=$(du -s -B1 --apparent-size "$d" | cut -f1); k=$(du -s -B1 "$d" | cut -f1)
  printf '%-6s %12s %12s  %s\n' "p$i" "$k" "$a" "$(cd "$d" && ls | grep -vE '^(MANIFEST|NPARTS|BUNDLES)$' | tr '\n' ' ')"
  { [ "$a" -lt "$LIMIT" ] && [ "$k" -lt "$LIMIT" ]; } || { echo "pack.sh: p$i is over $PART_MB MB" >&2; bad=1; }
done
tree=$(cd "$ROOT" && git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "working tree that travels with every call: $tree B"
echo "the first call carries [\".device/p1\"]$([ "$n" -gt 1 ] && echo "; then one call each for p2..p$n (DALI)")"
echo "(the calls and their minutes: docs/gpu-runbook.md)"
exit $bad
