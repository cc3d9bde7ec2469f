"""The GPU session's scripts run on CPU too, so a GPU session does not find their bugs first."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO, SHARED

CIFAR_JPEG = SHARED / "datasets" / "cifar10-jpeg.tar.gz"

BENCH = REPO / "scripts" / "device" / "bench_train.py"


def bench(*args: str) -> list[dict]:
    out = subprocess.run([sys.executable, BENCH, "--device", "cpu", "--precision", "fp32", "--iters", "2",
                          "--warmup", "1", "--batch-size", "16", "--models", "resnet20", *args],
                         capture_output=True, text=True, timeout=300)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_bench_train_times_a_fused_group_and_refuses_graph_on_cpu():
    eager, graph = bench("--steps", "eager,graph", "--fuse", "3")
    assert eager["fuse"] == 3 and eager["steps"] == 2 and eager["images_per_s"] > 0
    # all members' images count (the row rounds seconds to 0.1 ms and images/s to 0.1: at 14.6 img/s on a loaded
    # CI machine that alone was 0.3%, past a relative tolerance)
    assert eager["images_per_s"] == pytest.approx(2 * 16 * 3 / eager["seconds"], rel=2e-3, abs=0.051)
    assert 0 < eager["est_mem_gb"] < 1
    assert "needs a CUDA GPU" in graph["error"]


def test_bench_train_packed_processes_add_up():
    (row,) = bench("--steps", "eager", "--procs", "2")
    assert row["bench"] == "train_step_packed" and row["procs_ok"] == 2 and row["images_per_s"] > 0


UNPACK = REPO / "scripts" / "device" / "unpack.sh"


def make_part(folder, files: dict[str, bytes]) -> None:
    """A carried part as pack.sh writes it: the files and a sha256 MANIFEST of them."""
    import hashlib
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "MANIFEST").write_text("".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in files.items()))


def xz_bundle(module: str) -> bytes:
    """A bundle as pack.sh makes it: an installed site folder (here one module) as tar.xz."""
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        data = f"NAME = {module!r}\n".encode()
        info = tarfile.TarInfo(f"./{module}.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def unpack(root, tmp_path) -> str:
    env = {"DEVICE_ROOT": str(root), "STAGE": str(tmp_path / "stage"), "SITE": str(tmp_path / "site"),
           "DATA_DIR": str(tmp_path / "data"), "PY": sys.executable, "PATH": "/usr/bin:/bin"}
    out = subprocess.run(["bash", "-c", f"source {UNPACK}"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout + out.stderr


def test_unpack_extracts_a_whole_bundle_at_once_and_a_split_one_when_its_last_piece_arrives(tmp_path):
    import hashlib
    root, site = tmp_path / "root", tmp_path / "site"
    core, extra = xz_bundle("core_mod"), xz_bundle("extra_mod")
    half = len(extra) // 2
    bundles = (f"core.tar.xz {hashlib.sha256(core).hexdigest()} 0\n"
               f"extra.tar.xz {hashlib.sha256(extra).hexdigest()} 2\n").encode()
    make_part(root / ".device" / "p1", {"core.tar.xz": core, "BUNDLES": bundles, "NPARTS": b"3\n"})
    make_part(root / ".device" / "p2", {"extra.tar.xz.part-00": extra[:half]})
    broken = site / "nvidia" / "dali"  # a package that is there but does not import, as DALI without a driver
    broken.mkdir(parents=True)
    (site / "nvidia" / "__init__.py").write_text("")
    (broken / "__init__.py").write_text("raise ImportError('libcuda.so.1: cannot open shared object file')\n")
    out = unpack(root, tmp_path)
    assert (site / "core_mod.py").read_text() == "NAME = 'core_mod'\n"
    assert "extra.tar.xz: 1 of 2 pieces here; waiting" in out and not (site / "extra_mod.py").exists()
    # a package that does not import says why, so a gap in the image shows before the stages that need it
    assert re.search(r"unpack: nvidia dali +missing \(ImportError: libcuda.so.1: cannot open", out), out

    # the next call carries the last piece; a damaged part is refused by name and changes nothing
    make_part(root / ".device" / "p3", {"extra.tar.xz.part-01": extra[half:]})
    make_part(root / ".device" / "p4", {"junk": b"x"})
    (root / ".device" / "p4" / "junk").write_bytes(b"y")
    out = unpack(root, tmp_path)
    assert (site / "extra_mod.py").read_text() == "NAME = 'extra_mod'\n"
    assert "p4 is damaged" in out and "extracted core.tar.xz" not in out  # extracted once, not again


def test_summarize_turns_bench_rows_into_markdown_and_keeps_failed_cells(tmp_path):
    from importlib.util import module_from_spec, spec_from_file_location
    spec = spec_from_file_location("summarize", REPO / "scripts" / "device" / "summarize.py")
    summarize = module_from_spec(spec)
    spec.loader.exec_module(summarize)
    eager, graph = bench("--steps", "eager,graph")
    text = summarize.tables([eager, graph, {"bench": "loader", "cmd": "gpu b512", "images_per_s": 1234567.8}])
    assert f"| resnet20 | eager | 1 | {summarize.cell(eager['images_per_s'])} |" in text
    assert "| resnet20 | graph |" in text and "needs a CUDA GPU" in text  # the failed cell stays, with why
    assert "| gpu b512 |" in text and "1,234,567.8" in text


RUN_STUDY = REPO / "scripts" / "device" / "run_study.sh"


def plan_env(tmp_path) -> dict[str, str]:
    """run_study.sh's folders in tmp_path, nothing on PATH but the system's (as on the GPU machine)."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PY": sys.executable, "OUT": str(tmp_path / "out"),
            "STUDY": str(tmp_path / "study"), "DATA_DIR": str(tmp_path / "data"), "STAGE": str(tmp_path / "stage"),
            "SITE": str(tmp_path / "site"), "DEVICE_ROOT": str(tmp_path / "root")}


def test_a_stage_started_under_timeout_reaches_the_orchestrator(tmp_path):
    """`run` starts its command with timeout(1), which starts programs, not shell functions: the loader stage
    once ran `orchestrate` (a function of the script) and failed with 'command not found' before measuring."""
    subprocess.run(["bash", str(RUN_STUDY), "loader"], env=plan_env(tmp_path), capture_output=True, text=True,
                   timeout=300, cwd=REPO)
    log = (tmp_path / "out" / "study.log").read_text()
    # here it fails as it must on a CPU machine, inside the orchestrator: one line, exit 2
    assert "orchestrate bench-loader: error:" in log and "END loader-gpu: rc=2" in log, log[-2000:]


@pytest.mark.parametrize("plan, stages", [
    ("bench", ["gputests", "loader-gpu", "train", "fuse8", "pack-graph", "fuse-pack", "pack-graph8", "sweep for",
               "compile20"]),
    ("study", ["sweep for"]),
    ("compile", ["gputests-compile", "compile20", "compile-graph20", "compile-graph110", "compile56", "compile110", "fuse16"]),
])
def test_each_device_plan_dry_runs_its_stages_in_order(tmp_path, plan, stages):
    env = plan_env(tmp_path)
    if plan == "study":  # the sweep copy is validated against its data: the real archive, where run_study puts it
        if not CIFAR_JPEG.exists():
            pytest.skip(f"{CIFAR_JPEG} is absent (../shared beside the repo)")
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / CIFAR_JPEG.name).symlink_to(CIFAR_JPEG)
    out = subprocess.run(["bash", str(RUN_STUDY), "--dry-run", plan], env=env, capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    begun = [line.split("BEGIN ", 1)[1] for line in out.stdout.splitlines() if "BEGIN " in line]
    positions = [next(i for i, b in enumerate(begun) if b.startswith(s)) for s in stages]
    assert positions == sorted(positions), begun
    assert "left in this call" not in out.stdout  # a dry run takes no time: no stage is skipped for time
    if plan == "study":  # the sweep copy was written and dry-run by the orchestrator itself
        assert "dry run: nothing submitted" in out.stdout and (tmp_path / "study" / "cifar_depth_gpu.yaml").exists()


def test_the_sweep_copy_never_asks_for_more_cpus_than_the_trials_at_once_can_share():
    sys.path.insert(0, str(REPO / "scripts" / "device"))
    from make_spec import cpus_per_trial
    assert cpus_per_trial(2, 6, cores=16) == 2        # the default study: 6 trials x 2 CPUs fit
    assert cpus_per_trial(2, 10, cores=16) == 1       # whole CPUs above 1 (Ray's rule)
    assert cpus_per_trial(2, 18, cores=16) == 0.8888  # 18 trials at once on 16 cores
