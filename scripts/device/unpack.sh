#!/usr/bin/env bash
# On the GPU machine, at the start of every `run` call:  source scripts/device/unpack.sh
# (run_study.sh sources it itself). Idempotent across calls while the machine stays warm:
#   - copies whatever .device/pN folders this call (or an earlier one) carried into $STAGE, verified by sha256;
#   - extracts each bundle (core.tar.xz: pydantic, the MLflow client, Ray; dali.tar.xz) into $SITE once it
#     has arrived whole (a bundle split over several parts waits for its last piece);
#   - puts the CIFAR JPEG archive in $DATA_DIR and decodes it once into the project's .npy cache;
#   - exports PYTHONPATH=$SITE:<repo root> (the project runs from the checkout, no pip install) and friends.
# Prints one status line per component: what is usable now and what still has to arrive.
# Variables (defaults for the GPU machine; the tests here point them at temporary folders):
#   DEVICE_ROOT (repo root), STAGE=/tmp/devstage, SITE=/tmp/site, DATA_DIR=/tmp/data, PY=python3

_unpack_main() {
  local root=${DEVICE_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
  local stage=${STAGE:-/tmp/devstage} site=${SITE:-/tmp/site} data=${DATA_DIR:-/tmp/data} py=${PY:-python3}
  local t0=$SECONDS d f
  mkdir -p "$stage" "$site" "$data" || return 1

  # 1. what this call carried (earlier calls' folders may still be in the checkout: harmless, skipped)
  for d in "$root"/.device/p[0-9]*; do
    [ -f "$d/MANIFEST" ] || continue
    [ -f "$stage/done-$(basename "$d")" ] && continue
    if ! (cd "$d" && sha256sum --quiet -c MANIFEST); then
      echo "unpack: $(basename "$d") is damaged (sha256 mismatch); carry it again" >&2; continue
    fi
    for f in "$d"/*; do
      case $(basename "$f") in
        MANIFEST) ;;
        cifar10-jpeg.tar.gz) cp -n "$f" "$data/" ;;
        *) cp "$f" "$stage/" ;;
      esac
    done
    touch "$stage/done-$(basename "$d")"
    echo "unpack: took $(basename "$d")"
  done
  echo "unpack: parts arrived so far: $(cd "$stage" && ls done-p* 2>/dev/null | sed 's/done-//' | sort -V | tr '\n' ' ')(of $(cat "$stage/NPARTS" 2>/dev/null || echo '?'))"

  # 2. bundles that are here whole: reassembled if split, checked, extracted into the site folder once
  local name sum pieces have
  [ -f "$stage/BUNDLES" ] && while read -r name sum pieces; do
    [ -z "$name" ] || [ -f "$stage/extracted-$name" ] && continue
    if [ "$pieces" -gt 0 ]; then
      have=$(ls "$stage" | grep -cF "$name.part-" || true)
      if [ "$have" -lt "$pieces" ]; then echo "unpack: $name: $have of $pieces pieces here; waiting for the rest"; continue; fi
      cat "$stage/$name".part-* > "$stage/$name" && rm -f "$stage/$name".part-*
    fi
    if [ "$(sha256sum "$stage/$name" | cut -d' ' -f1)" != "$sum" ]; then
      echo "unpack: $name has the wrong sha256; carry its part(s) again" >&2; rm -f "$stage/$name" "$stage"/done-p*; continue
    fi
    "$py" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="tar")' "$stage/$name" "$site" \
      && rm -f "$stage/$name" && touch "$stage/extracted-$name" && echo "unpack: extracted $name into $site"
  done < "$stage/BUNDLES"

  export PYTHONPATH=$site:$root${PYTHONPATH:+:$PYTHONPATH}
  export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0 DO_NOT_TRACK=1
  export PATH=$site/bin:$PATH

  # 3. what works now (one process; ~3 s); and the data, decoded once into the project's cache
  UNPACK_SITE=$site "$py" - "$data" <<'PY'
import importlib, sys, time
from pathlib import Path
def have(mod):
    """'ready <version>', or 'missing (<why>)': a package the image lacks shows here, not as a later traceback."""
    try:
        m = importlib.import_module(mod); return f"ready {getattr(m, '__version__', '')}"
    except Exception as e:
        return f"missing ({type(e).__name__}: {e})"
rows = {"pydantic (configs)": "pydantic", "mlflow client": "mlflow", "ray tune": "ray.tune", "nvidia dali": "nvidia.dali"}
for label, mod in rows.items():
    print(f"unpack: {label:20s} {have(mod)}")
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
