#!/usr/bin/env bash
# On the GPU machine, at the start of every `run` call:  source scripts/device/unpack.sh
# (run_study.sh sources it itself). Idempotent across calls while the machine stays warm:
#   - copies whatever .device/pN folders this call (or an earlier one) carried into $STAGE, verified by sha256;
#   - reassembles split wheels once all their pieces have arrived (ray: p2 + p3; DALI: p4...);
#   - installs every wheel that has arrived with pip --no-index --no-deps into $SITE (again only when the set
#     changed; all in one pip call, into a fresh folder swapped in, since mlflow-skinny and friends share mlflow/);
#   - puts the CIFAR JPEG archive in $DATA_DIR and decodes it once into the project's .npy cache;
#   - exports PYTHONPATH=$SITE:<repo root> (the project runs from the checkout, no pip install) and friends.
# Prints one status line per component: what is usable now and what still has to arrive.
# Variables (defaults for the GPU machine; the tests here point them at temporary folders):
#   DEVICE_ROOT (repo root), STAGE=/tmp/devstage, SITE=/tmp/site, DATA_DIR=/tmp/data, PY=python3

_unpack_main() {
  local root=${DEVICE_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
  local stage=${STAGE:-/tmp/devstage} site=${SITE:-/tmp/site} data=${DATA_DIR:-/tmp/data} py=${PY:-python3}
  local t0=$SECONDS d f
  mkdir -p "$stage/wheels" "$stage/pieces" "$data" || return 1

  # 1. what this call carried (earlier calls' folders may still be in the checkout: harmless, verified again)
  for d in "$root"/.device/p[0-9]*; do
    [ -f "$d/MANIFEST" ] || continue
    [ -f "$stage/done-$(basename "$d")" ] && continue
    if ! (cd "$d" && sha256sum --quiet -c MANIFEST); then
      echo "unpack: $(basename "$d") is damaged (sha256 mismatch); carry it again" >&2; continue
    fi
    [ -d "$d/wheels" ] && cp -n "$d"/wheels/*.whl "$stage/wheels/" 2>/dev/null
    [ -d "$d/pieces" ] && cp -n "$d"/pieces/* "$stage/pieces/"
    for f in pieces.txt NPARTS; do [ -f "$d/$f" ] && cp "$d/$f" "$stage/"; done
    [ -f "$d/cifar10-jpeg.tar.gz" ] && cp -n "$d/cifar10-jpeg.tar.gz" "$data/"
    touch "$stage/done-$(basename "$d")"
    echo "unpack: took $(basename "$d")"
  done
  local nparts; nparts=$(cat "$stage/NPARTS" 2>/dev/null || echo "?")
  echo "unpack: parts arrived so far: $(cd "$stage" && ls done-p* 2>/dev/null | sed 's/done-//' | sort -V | tr '\n' ' ')(of $nparts)"

  # 2. split wheels whose pieces are all here
  if [ -f "$stage/pieces.txt" ]; then
    local name sum count have
    while read -r name sum count; do
      [ -z "$name" ] && continue
      [ -f "$stage/assembled-$name" ] && continue
      have=$(ls "$stage/pieces" | grep -cF "$name.part-" || true)
      if [ "$have" -lt "$count" ]; then echo "unpack: $name: $have of $count pieces here; waiting for the rest"; continue; fi
      cat "$stage/pieces/$name".part-* > "$stage/$name.tmp"
      if [ "$(sha256sum "$stage/$name.tmp" | cut -d' ' -f1)" != "$sum" ]; then
        echo "unpack: $name: reassembled file has the wrong sha256" >&2; rm -f "$stage/$name.tmp"; continue
      fi
      case $name in
        *.whl) mv "$stage/$name.tmp" "$stage/wheels/$name" ;;
        *.tar) tar -C "$stage/wheels" -xf "$stage/$name.tmp" && rm "$stage/$name.tmp" ;;
      esac
      rm -f "$stage/pieces/$name".part-*
      touch "$stage/assembled-$name"; echo "unpack: reassembled $name"
    done < "$stage/pieces.txt"
  fi

  # 3. install the wheels that are here, if the set changed since the last install
  local fingerprint; fingerprint=$(ls "$stage/wheels" | sort | sha256sum | cut -c1-16)
  if [ -n "$(ls "$stage/wheels")" ] && [ "$(cat "$site/.fingerprint" 2>/dev/null)" != "$fingerprint" ]; then
    rm -rf "$site.new"
    if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$site.new" "$stage"/wheels/*.whl; then
      echo "$fingerprint" > "$site.new/.fingerprint"; rm -rf "$site"; mv "$site.new" "$site"
      echo "unpack: installed $(ls "$stage/wheels" | wc -l) wheels into $site"
    else
      echo "unpack: pip install failed; $site left as it was" >&2
    fi
  fi

  export PYTHONPATH=$site:$root${PYTHONPATH:+:$PYTHONPATH}
  export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0 DO_NOT_TRACK=1
  export PATH=$site/bin:$PATH

  # 4. what works now (one process; ~3 s); and the data, decoded once into the project's cache
  UNPACK_SITE=$site "$py" - "$data" <<'PY'
import importlib, sys, time
from pathlib import Path
def have(mod):
    try:
        m = importlib.import_module(mod); return getattr(m, "__version__", "ok")
    except Exception as e:
        return None
rows = {"pydantic (configs)": "pydantic", "mlflow client": "mlflow", "ray tune": "ray", "nvidia dali": "nvidia.dali"}
for label, mod in rows.items():
    v = have(mod)
    print(f"unpack: {label:20s} {'ready ' + str(v) if v else 'missing'}")
# version conflicts between what we carried and what the image has (missing optional deps are expected)
try:
    import importlib.metadata as md, os
    from packaging.requirements import Requirement
    site = os.environ.get("UNPACK_SITE", "")
    conflicts = []
    for d in md.distributions(path=[site]) if site else []:
        for r in d.requires or []:
            req = Requirement(r)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have_v = md.version(req.name)
            except md.PackageNotFoundError:
                continue
            if req.specifier and not req.specifier.contains(have_v, prereleases=True):
                conflicts.append(f"{d.metadata['Name']} needs {req}, found {have_v}")
    print("unpack: version conflicts    " + ("; ".join(sorted(set(conflicts))) if conflicts else "none"))
except Exception as err:
    print(f"unpack: version check failed: {err}")
archive = Path(sys.argv[1]) / "cifar10-jpeg.tar.gz"
if not archive.exists():
    print("unpack: data                 missing (arrives with p1)")
elif have("pydantic") is None:
    print("unpack: data                 archive here; decode waits for pydantic (p1)")
else:
    t = time.perf_counter()
    try:
        from resnet_core.data import DataConfig, load_split
        cfg = DataConfig(path=str(archive))
        n = sum(len(load_split(cfg, s)[1]) for s in ("train", "test"))
        print(f"unpack: data                 ready: {n} images decoded/cached in {time.perf_counter() - t:.1f} s ({archive})")
    except Exception as err:
        print(f"unpack: data                 FAILED to decode: {type(err).__name__}: {err}")
PY
  echo "unpack: done in $((SECONDS - t0)) s; PYTHONPATH=$PYTHONPATH"
}
_unpack_main "$@"
_unpack_rc=$?
# shellcheck disable=SC2317
return $_unpack_rc 2>/dev/null || exit $_unpack_rc
