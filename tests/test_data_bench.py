"""`orchestrate bench-loader`: one JSON line per loader, a comparison table, errors as exit code 2."""
from __future__ import annotations

import json

import pytest

from orchestrator.cli import main

pytestmark = pytest.mark.timeout(180)


def test_bench_loader_prints_one_json_line(capsys):
    assert main(["bench-loader", "--loader", "gpu", "--data", "synthetic", "--batch-size", "64", "--batches", "12",
                 "--synthetic-size", "512"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["loader"] == "gpu" and result["images"] == 64 * 12 and result["images_per_s"] > 0


def test_bench_loader_compare_prints_every_loader_with_ratios(capsys):
    args = ["bench-loader", "--compare", "--data", "synthetic", "--batch-size", "32", "--batches", "3", "--workers", "0",
            "--synthetic-size", "256"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for name in ("gpu", "dali", "torch"):
        assert f"│ {name}" in out
    assert "x torch" in out and "1.00" in out  # torch's own ratio


def test_a_loader_that_breaks_mid_compare_is_a_failed_row_and_the_others_are_measured(capsys, monkeypatch):
    from orchestrator.commands import bench_loader
    measure = bench_loader.measure

    def dali_breaks(args, name):  # as DALI's GPU decoder might on a driver it was not built for
        if name == "dali":
            raise RuntimeError("nvJPEG: decoder failed")
        return measure(args, name)

    monkeypatch.setattr(bench_loader, "measure", dali_breaks)
    args = ["bench-loader", "--compare", "--data", "synthetic", "--batch-size", "32", "--batches", "3", "--workers", "0",
            "--synthetic-size", "256"]
    assert main(args) == 1  # a script running the bench notices
    out = capsys.readouterr().out
    assert "failed" in out and "RuntimeError: nvJPEG: decoder failed" in out and "1.00" in out  # torch measured


def test_bench_loader_bad_input_is_exit_code_2(capsys, tmp_path):
    assert main(["bench-loader", "--data", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["bench-loader", "--loader", "tpu"])
    assert exit_info.value.code == 2 and "invalid choice: 'tpu'" in capsys.readouterr().err


def test_compare_on_an_imagenet_sized_folder_skips_the_gpu_loader_and_measures_the_others(capsys, tmp_path):
    """The gpu loader's "not held as one array" ended the whole comparison with one line and no table."""
    from test_data_helpers import write_image_folder
    root = write_image_folder(tmp_path / "inet", {"train": 4, "test": 2}, suffix=".jpg", size=96)
    assert main(["bench-loader", "--compare", "--data", str(root), "--batch-size", "4", "--batches", "2",
                 "--workers", "1", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "CIFAR-sized" in out and "1.00" in out  # torch measured, its own ratio
    assert out.count("failed") == 0 and "│ dali" in out
