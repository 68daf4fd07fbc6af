"""search/bench.py (``regsweep bench``, benchmarks/bench.py, gpu_check.sh): the dry run measures and prints
every figure on the CPU in seconds. Timings are never asserted; only that each figure exists and is sane."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _numbers(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _numbers(v)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield node


@pytest.mark.bench
def test_dry_run_measures_and_prints_every_figure(tmp_path, capsys, monkeypatch):
    import torch

    from regsweep.search import bench

    monkeypatch.setattr(bench, "_cores", lambda: 1)  # one thread per process: no spinning on a shared CI box
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out_json = tmp_path / "figures.json"
    try:
        figures = bench.run("cpu", "dry-run", str(out_json))
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert text.startswith("plan (dry-run, cpu):")
    assert json.loads(out_json.read_text()) == json.loads(json.dumps(figures))
    assert all(math.isfinite(v) for v in _numbers(figures))
    for name in ("mnist_cnn", "resnet18"):
        w = figures[name]
        assert w["seeds"]["batch"] == 64 and w["seeds"]["epoch_s"] > 0 and w["fit"]["epoch_s"] > 0
        assert w["speedup"] == pytest.approx(w["seeds"]["epoch_s"] / w["fit"]["epoch_s"])
        assert w["fit"]["images_per_s"] == pytest.approx(w["n_train"] / w["fit"]["epoch_s"])
        for way in ("seeds", "fit"):
            row = next(line for line in text.splitlines() if line.split()[:2] == [name, way])
            assert float(row.split()[-3]) == pytest.approx(w[way]["epoch_s"], abs=6e-5)
    assert figures["mnist_cnn"]["batch"] == 128  # studies/mnist_cnn.yaml's own batch size
    flops = figures["resnet18"]["flops"]
    assert flops["train_per_image"] > 2 * flops["forward_per_image"] > 0  # backward counted, not x3
    assert f"achieved {flops['tflops']:.3f} TFLOP/s" in text
    packing = figures["packing"]
    assert list(packing["k"]) == ["1", "2"] and packing["ratio"]["1"] == 1.0
    for k, r in packing["k"].items():
        assert r["trials"] == int(k) and r["threads"] == max(1, packing["cores"] // int(k))
        assert f"{k} packed: {r['trials_per_hour']:>9.0f} trials/hour" in text
    fused = figures["fused"]  # issue 20's arms: N trials as one fused group vs one at a time
    assert list(fused) == ["mnist_cnn", "digits_cnn", "resnet20"]
    assert list(fused["mnist_cnn"]["n"]) == ["1", "2"] and list(fused["resnet20"]["n"]) == ["2"]
    for name, w in fused.items():
        assert w["mode"] == "loop" and w["solo_s"] > 0
        assert w["best_ratio"] == max(r["ratio"] for r in w["n"].values())
        for n, r in w["n"].items():
            assert r["trials_per_hour"] == pytest.approx(int(n) * 3600 / r["wall_s"])
            assert r["ratio"] == pytest.approx(r["trials_per_hour"] / w["solo_trials_per_hour"])
            assert f"fused N = {n:>2}: {r['trials_per_hour']:>9.0f} trials/hour" in text
    for label in ("mnist_cnn fit epoch (s) <= 0.12", "resnet18 fit epoch (s) <= 0.6",
                  "4 packed / 1: trials/hour >= 2.5", "fused mnist_cnn best N / 1: trials/hour (issue 20) >= 6.0"):
        assert f"  {label}: " in text and "n/a: dry-run sizes on cpu" in text


def test_cli_bench_rejects_an_unknown_workload(capsys):
    from regsweep.search.cli import main

    assert main(["bench", "--device", "cpu", "--dry-run", "--only", "vgg"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --only: 'vgg' is not allowed") and err.count("\n") == 1


def test_bench_imports_neither_optuna_nor_ray():
    """The GPU host has no optuna: search.bench (and the recording path it uses) must import without it."""
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('optuna', 'ray'):\n"
            "            raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import regsweep.search.bench\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('optuna', 'ray')))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
