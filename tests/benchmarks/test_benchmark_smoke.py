"""The benchmark scripts at smoke size: ``benchmarks/speed.py`` runs both modes for one tiny epoch
on synthetic CIFAR-100 and its output has the promised structure (timings are not asserted);
``benchmarks/fidelity.py`` trains both sides on tiny Fashion-MNIST written as CIFAR-10 and its
statistics are recomputed from the per-seed values and the saved logits; every script imports and
answers ``--help``; the label-shift rows run on the library's selector."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace as E

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from formats import write_fashion_mnist
from torch.autograd import DeviceType

from balpoe.data.build import build_data
from balpoe.data.cifar import load_cifar
from balpoe.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from balpoe.data.lt import lt_class_counts
from balpoe.data.mixup import mixup_targets
from balpoe.losses.priors import log_prior
from balpoe.errors import BalpoeError
from balpoe.losses.build import build_criterion
from balpoe.recipe import load_recipe, recipe_from_dict
from balpoe.runtime.precision import use_amp
from balpoe.shift.distributions import TEST_DISTRIBUTIONS
from balpoe.shift.targets import target_sets
from balpoe.training.build import build_scheduler

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
SCRIPT = BENCH / "speed.py"
SCRIPTS = ("speed", "fidelity", "label_shift", "mislas_ablation")
CIFAR10_RECIPE = ROOT / "recipes" / "balpoe" / "cifar10_lt_ir100.yaml"


@pytest.fixture
def load_script(monkeypatch):
    """``load_script(name)``: import ``benchmarks/<name>.py`` as ``python benchmarks/<name>.py`` sees
    it, with its own directory importable (the scripts import their siblings ``profile_step`` and
    ``reference_balpoe``) and the module registered while it runs (dataclasses look it up)."""
    monkeypatch.syspath_prepend(str(BENCH))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, mod)
        spec.loader.exec_module(mod)
        return mod
    return load


def test_speed_fast_and_reference_smoke(tmp_path):
    out = tmp_path / "speed.json"
    cmd = [sys.executable, str(SCRIPT), "--synthetic", "--synthetic-test-per-class", "2", "--limit", "96",
           "--epochs", "1", "--warmup-epochs", "0", "--reference", "--ref-workers", "1", "--threads", "1",
           "--breakdown", "--set", "model.backbone=small_cnn", "--set", "model.kwargs={widths: [8, 16, 32]}",
           "--set", "optim.batch_size=32", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = proc.stdout
    assert "SYNTHETIC" in text and "speed-up (fast img/s / reference img/s):" in text
    assert "fast" in text and "reference" in text and "img/s" in text

    r = json.loads(out.read_text())
    assert r["data"]["synthetic"] is True and "SYNTHETIC" in r["data"]["note"]
    assert r["data"]["dataset"] == "cifar100" and r["data"]["images_per_epoch"] == 96
    assert set(r["modes"]) == {"fast", "reference"} and r["epochs"] == 1
    for mode in r["modes"].values():
        assert mode["images_per_epoch"] == 96 and len(mode["epoch_seconds"]) == 1
        for key in ("s_per_epoch", "img_per_s", "cpu_s_per_epoch", "peak_mem_mib", "loader_s_per_epoch"):
            assert isinstance(mode[key], float) and mode[key] > 0
        assert mode["peak_mem_kind"] in ("cuda_max_allocated", "rss_high_water_mark",
                                         "rss_high_water_mark_process_lifetime")
    assert r["modes"]["fast"]["settings"]["loader"] == "DeviceLoader"
    assert r["modes"]["reference"]["settings"]["loader"].startswith("DataLoader")
    assert r["speedup"] == r["modes"]["fast"]["img_per_s"] / r["modes"]["reference"]["img_per_s"]
    assert r["cpu_time_ratio"] == r["modes"]["reference"]["cpu_s_per_epoch"] / r["modes"]["fast"]["cpu_s_per_epoch"]


def test_synthetic_cifar100_is_real_format_and_lt_ir100_size(tmp_path, load_script):
    root = load_script("speed").write_synthetic_cifar100(tmp_path, lt_class_counts(500, 100, 100), test_per_class=1)
    assert sorted(p.name for p in (root / "cifar-100-python").iterdir()) == ["meta", "test", "train"]
    recipe = recipe_from_dict({"data": {"dataset": "cifar100", "root": str(root), "imb_factor": 100}})
    bundle = build_data(recipe.data, "cpu")
    assert len(bundle.train) == 10_847 and bundle.train.images.shape[1:] == (3, 32, 32)
    assert bundle.class_counts[0] == 500 and bundle.class_counts[-1] == 5 and len(bundle.test) == 100
    assert bundle.train.images.dtype == torch.uint8


# ------------------------------------------------------------------------------------------------
# --profile, --levers, --write-synthetic (in-process: main(argv) returns the JSON dict; no --threads,
# so the test process keeps its torch settings)

TINY = ["--synthetic", "--synthetic-test-per-class", "1", "--limit", "64", "--epochs", "1", "--warmup-epochs", "0",
        "--device", "cpu", "--set", "model.backbone=small_cnn", "--set", "model.kwargs={widths: [8, 16, 32]}",
        "--set", "optim.batch_size=32"]


def _check_top(profile: dict, steps: int) -> None:
    top = profile["top"]
    assert profile["steps"] == steps and 0 < len(top) <= 15
    pcts = [r["pct"] for r in top]
    assert all(0 < p <= 100 for p in pcts) and sum(pcts) <= 100 + 1e-6
    assert pcts == sorted(pcts, reverse=True)
    assert all(r["calls"] >= 1 and r["total_ms"] > 0 and r["name"] for r in top)
    assert abs(sum(c["pct"] for c in profile["categories"]) - 100) < 1e-6
    assert profile["wall_ms_per_step"] > 0 and profile["profiled_wall_ms_per_step"] > 0


def test_profile_top_ops_cpu(tmp_path, capsys, load_script):
    trace, out = tmp_path / "trace.json.gz", tmp_path / "p.json"
    r = load_script("speed").main(TINY + ["--profile", "3", "--trace", str(trace), "--json", str(out)])
    p = r["modes"]["fast"]["profile"]
    _check_top(p, 3)
    assert p["device"] == "cpu" and p["time_kind"] == "self CPU time" and 0 < p["op_cpu_fraction"]
    assert any(row["name"].startswith("aten::") for row in p["top"])
    assert json.loads(out.read_text())["modes"]["fast"]["profile"]["top"] == p["top"]
    assert "traceEvents" in json.loads(gzip.decompress(trace.read_bytes()))
    text = capsys.readouterr().out
    assert "top" in text and "ops by self CPU time over 3 steps" in text and "% of profiled" in text


def test_profile_summary_cuda_events(load_script):
    """The CUDA branch of the summary on hand-made events: kernels vs launches vs graph launches."""
    summarise_events = load_script("profile_step").summarise_events
    cuda, cpu = DeviceType.CUDA, DeviceType.CPU
    events = [E(key="void cudnn::bn_fw_tr_1C11_kernel_NCHW", count=20, device_type=cuda, self_cpu_time_total=0,
                self_device_time_total=2000.0),
              E(key="sm90_xmma_fprop_implicit_gemm_bf16", count=10, device_type=cuda, self_cpu_time_total=0,
                self_device_time_total=6000.0),
              E(key="Memcpy HtoD (Pageable -> Device)", count=2, device_type=cuda, self_cpu_time_total=0,
                self_device_time_total=0.0),
              E(key="cudaLaunchKernel", count=30, device_type=cpu, self_cpu_time_total=900, self_device_time_total=0),
              E(key="cudaGraphLaunch", count=2, device_type=cpu, self_cpu_time_total=50, self_device_time_total=0),
              E(key="aten::cudnn_convolution", count=10, device_type=cpu, self_cpu_time_total=500,
                self_device_time_total=6000.0)]
    p = summarise_events(events, steps=2, on_cuda=True, plain_s=0.010, profiled_s=0.016)
    _check_top(p, 2)
    assert [r["name"] for r in p["top"]] == ["sm90_xmma_fprop_implicit_gemm_bf16",
                                             "void cudnn::bn_fw_tr_1C11_kernel_NCHW"]
    assert [r["pct"] for r in p["top"]] == [75.0, 25.0]
    assert p["kernel_ms_per_step"] == 4.0 and p["kernels_per_step"] == 15 and p["launch_calls_per_step"] == 15
    assert p["graph_launches_per_step"] == 1 and p["gpu_busy_fraction"] == 0.5
    assert p["gpu_busy_fraction_unprofiled_wall"] == 0.8
    assert {c["category"] for c in p["categories"]} == {"convolution / matmul", "batch norm"}


def test_levers_one_row_per_applicable_lever(capsys, load_script):
    r = load_script("speed").main(TINY + ["--levers", "--skip-levers", "compile"])
    amp = use_amp(torch.device("cpu"), True, warn=False)   # bf16 where the trainer uses it on this CPU
    expected = ["eager"] + (["amp"] if amp else []) + ["channels_last", "batched_experts"]
    rows = r["levers"]
    assert [row["lever_key"] for row in rows] == expected          # reduce-overhead: CUDA only
    assert all(row["s_per_epoch"] > 0 and row["img_per_s"] > 0 and row["peak_mem_mib"] > 0 for row in rows)
    assert rows[0]["speedup_vs_first"] == rows[0]["speedup_vs_previous"] == 1.0
    for prev, row in zip(rows, rows[1:]):
        assert row["speedup_vs_previous"] == row["img_per_s"] / prev["img_per_s"]
        assert row["speedup_vs_reference"] is None
    cl = expected.index("channels_last")
    assert rows[cl]["settings"]["channels_last"] and not rows[cl - 1]["settings"]["channels_last"]
    assert [row["settings"]["amp_bf16"] for row in rows] == [amp and k != "eager" for k in expected]
    assert not any(row["settings"]["compile"] for row in rows)
    skipped = {s["key"]: s["reason"] for s in r["levers_skipped"]}
    assert {"compile", "reduce-overhead"} <= set(skipped) and "CUDA only" in skipped["reduce-overhead"]
    assert amp or "no native bf16" in skipped["amp"]
    b = expected.index("batched_experts")
    assert rows[b]["settings"]["batched_experts"] and not rows[b - 1]["settings"]["batched_experts"]
    assert r["modes"]["fast"]["lever"] == r["best_lever"] and r["best_lever"] in {row["lever"] for row in rows}
    text = capsys.readouterr().out
    assert "speed levers, cumulative" in text and "eager fp32 NCHW" in text and "+channels_last" in text


def test_write_synthetic_is_read_by_the_cifar_loader(tmp_path, load_script):
    r = load_script("speed").main(["--write-synthetic", str(tmp_path / "syn"), "--synthetic-test-per-class", "1"])
    assert r["train_images"] == 10_847 and Path(r["folder"]).is_dir()
    recipe = load_recipe(ROOT / "recipes" / "balpoe" / "cifar100_lt_ir100.yaml",
                         [f"data.root={tmp_path / 'syn'}", "data.download=false"])
    bundle = build_data(recipe.data, "cpu", seed=recipe.seed)
    counts = bundle.class_counts.tolist()
    assert len(bundle.train) == 10_847 and counts == r["class_counts"] and len(bundle.test) == 100
    assert counts[0] == 500 and counts[-1] == 5 and counts == sorted(counts, reverse=True)


def test_bad_lever_and_compile_mode_are_usage_errors(capsys, load_script):
    mod = load_script("speed")
    for argv in (["--levers", "--skip-levers", "bogus"], ["--compile-mode", "bogus"], ["--trace", "t.json"]):
        with pytest.raises(SystemExit) as e:
            mod.main(argv)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown lever(s) bogus" in err and "invalid choice: 'bogus'" in err and "--trace needs --profile" in err


# ------------------------------------------------------------------------------------------------
# fidelity.py: the library as shipped vs the official-style run, with statistics

FIDELITY_TINY = ["--limit", "256", "--epochs", "1", "--seeds", "0", "1", "--workers", "0", "--threads", "1",
                 "--device", "cpu", "--set", "model.backbone=small_cnn", "--set", "model.kwargs={widths: [8, 16, 32]}",
                 "--set", "model.split=layer1"]


def test_fidelity_smoke_statistics(tmp_path, load_script):
    """Both sides, 2 seeds, 1 epoch on 256 images of tiny Fashion-MNIST written as CIFAR-10: the data
    cache is the padded, 3-channel Fashion-MNIST; every run's metrics are those of its saved logits;
    means, std, the Welch SE of fast - reference and the 11-distribution mean are recomputed."""
    fm = write_fashion_mnist(tmp_path / "fm", 120, 20, seed=0)
    data, out, js = tmp_path / "data", tmp_path / "out", tmp_path / "fidelity.json"
    args = FIDELITY_TINY + ["--fmnist-root", str(fm), "--data-dir", str(data), "--out", str(out)]
    proc = subprocess.run([sys.executable, str(BENCH / "fidelity.py"), *args, "--json", str(js)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fast - reference" in proc.stdout and "[4/4] reference seed 1 done" in proc.stdout

    # the data: Fashion-MNIST zero-padded to 32 x 32 and replicated to 3 channels, CIFAR-10 layout
    x, y, names = load_cifar(data, 10, train=True)
    fx, fy, _ = load_fashion_mnist(fm, train=True)
    assert x.shape == (1200, 3, 32, 32) and names == CLASS_NAMES and np.array_equal(y, fy)
    assert np.array_equal(x[:, :, 2:30, 2:30], np.repeat(fx, 3, axis=1))
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert not x[:, :, border].any()

    r = json.loads(js.read_text())
    assert r == json.loads((out / "results.json").read_text())
    assert r["data"]["train_images"] == 256 == sum(r["data"]["class_counts"]) and r["complete"]
    assert r["epochs"] == 1 and r["schedule"]["warmup_epochs"] == 0 and r["schedule"]["mixup_alpha"] == 0.4
    assert set(r["runs"]) == {"fast", "reference"}
    labels = None
    for side, by_seed in r["runs"].items():
        assert set(by_seed) == {"0", "1"}
        for seed, run in by_seed.items():
            m = run["metrics"]
            assert list(run["sade"]) == list(TEST_DISTRIBUTIONS) and len(run["sade"]) == 11
            assert math.isclose(m["sade_mean"], sum(run["sade"].values()) / 11, rel_tol=1e-12)
            # the shared evaluator: every number comes from the run's saved float32 test logits
            saved = torch.load(out / side / f"seed{seed}" / "test_logits.pt")
            expert, labels = saved["expert_logits"], saved["labels"]
            assert expert.shape == (3, 200, 10) and expert.dtype == torch.float32
            ens = expert.mean(0)
            assert math.isclose(m["acc"], (ens.argmax(1) == labels).double().mean().item() * 100, rel_tol=1e-9)
            assert math.isclose(m["nll"], F.cross_entropy(ens.double(), labels).item(), rel_tol=1e-9)
            sets = target_sets(labels, r["data"]["class_counts"], list(TEST_DISTRIBUTIONS))
            for name, t in sets.items():
                acc = (ens[t.indices].argmax(1) == labels[t.indices]).double().mean().item() * 100
                assert math.isclose(run["sade"][name], acc, rel_tol=1e-9), name
            assert len(sets["forward50"].indices) < len(sets["uniform"].indices) == 200
            assert [row["epoch"] for row in run["curve"]] == [1] and run["wall_s"] > 0
        assert ("library_eval" in by_seed["0"]) == (side == "fast")

    # the statistics, recomputed from the per-seed values
    for metric in r["metrics"]:
        stats = {}
        for side in ("fast", "reference"):
            v = [run["metrics"][metric] for run in r["runs"][side].values() if run["metrics"][metric] is not None]
            s = r["summary"][side][metric]
            assert s["n"] == len(v) and s["values"] == v
            if len(v) == 2:
                mean, std = (v[0] + v[1]) / 2, abs(v[0] - v[1]) / math.sqrt(2)
                assert math.isclose(s["mean"], mean, rel_tol=1e-12, abs_tol=1e-12)
                assert math.isclose(s["std"], std, rel_tol=1e-9, abs_tol=1e-12)
                stats[side] = (mean, std)
        d = r["difference"][metric]
        if len(stats) == 2:
            (ma, sa), (mb, sb) = stats["fast"], stats["reference"]
            se = math.sqrt(sa ** 2 / 2 + sb ** 2 / 2)
            assert math.isclose(d["diff"], ma - mb, rel_tol=1e-9, abs_tol=1e-12)
            assert math.isclose(d["se"], se, rel_tol=1e-9, abs_tol=1e-12)
            assert d["within_2se"] == (abs(ma - mb) <= 2 * se)
        p = r["paired"][metric]
        if p["n"] == 2:
            diffs = [r["runs"]["fast"][k]["metrics"][metric] - r["runs"]["reference"][k]["metrics"][metric]
                     for k in ("0", "1")]
            assert math.isclose(p["mean"], sum(diffs) / 2, rel_tol=1e-9, abs_tol=1e-12)

    # resumable: --report-only reuses every run (in process: no training, no thread change)
    md = tmp_path / "fidelity.md"
    again = load_script("fidelity").main(args + ["--report-only", "--markdown", str(md)])
    assert again["runs"] == r["runs"] and again["difference"] == r["difference"]
    # the Markdown tables: one row per side with its per-seed accuracies and mean ± std, then the difference
    rows = md.read_text().splitlines()
    fast_row = next(line for line in rows if line.startswith("| fast (library as shipped) |"))
    acc = r["summary"]["fast"]["acc"]
    assert f"| 0, 1 | {', '.join(f'{v:.2f}' for v in acc['values'])} | {acc['mean']:.2f} ± {acc['std']:.2f} |" in fast_row
    d = r["difference"]["acc"]
    diff_row = next(line for line in rows if line.startswith("| fast − reference |"))
    assert diff_row.startswith(f"| fast − reference | {d['diff']:+.2f} ± {d['se']:.2f}")

    # a reference run killed during its evaluation (model.pt written, no result.json) is evaluated
    # from its saved weights, not trained again: same metrics, same training curve
    ref_dir = out / "reference" / "seed1"
    (ref_dir / "result.json").unlink()
    mtime = (ref_dir / "model.pt").stat().st_mtime_ns
    proc = subprocess.run([sys.executable, str(BENCH / "fidelity.py"), *args, "--sides", "reference", "--seeds", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "training had finished; evaluating" in proc.stdout and "training ..." not in proc.stdout
    redone = json.loads((ref_dir / "result.json").read_text())
    assert (ref_dir / "model.pt").stat().st_mtime_ns == mtime
    assert redone["metrics"] == r["runs"]["reference"]["1"]["metrics"]
    assert redone["curve"] == r["runs"]["reference"]["1"]["curve"]


def test_fidelity_schedule_matches_the_official_customlr(load_script):
    """The CPU default compresses the recipe to 12 epochs (warmup 1, milestones [9, 10], mixup 0.4),
    and the reference's official CustomLR gives the library's per-epoch learning rates, compressed
    and at the full 200 epochs."""
    mod = load_script("fidelity")
    ref = load_script("reference_balpoe")
    recipe = load_recipe(CIFAR10_RECIPE)
    over = mod.schedule_overrides(recipe, 12, None)
    assert over == ["optim.epochs=12", "optim.warmup_epochs=1", "optim.milestones=[9, 10]", "train.mixup_alpha=0.4"]
    assert mod.schedule_overrides(recipe, 200, None) == []
    assert mod.schedule_overrides(recipe, 1, None)[:3] == ["optim.epochs=1", "optim.warmup_epochs=0",
                                                           "optim.milestones=[1, 1]"]
    for r in (load_recipe(CIFAR10_RECIPE, over), recipe):
        lrs = {}
        for name in ("library", "official"):
            opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=r.optim.lr)
            sched = build_scheduler(r.optim, opt) if name == "library" else ref.reference_scheduler(opt, r)
            lrs[name] = []
            for _ in range(r.optim.epochs):
                lrs[name].append(opt.param_groups[0]["lr"])
                opt.step()
                sched.step()
        assert np.allclose(lrs["library"], lrs["official"], rtol=1e-12, atol=0)
        assert lrs["official"][-1] == pytest.approx(r.optim.lr * r.optim.gamma ** 2)


def test_fidelity_sides_start_alike_and_share_the_loss(tmp_path, cifar_root, load_script):
    """Same seed, same initial weights: the library's ``train`` and the reference's official-style
    run (seed_everything, the official numpy reset, the model) with a vanishing learning rate end
    with identical parameters; and the library's soft-target loss is the official
    ``lam * L(y_a) + (1 - lam) * L(y_b)`` of BSExpertLoss."""
    mod = load_script("fidelity")
    ref = load_script("reference_balpoe")
    over = [f"data.root={cifar_root}", "data.download=false", "data.imb_factor=10", "seed=3", "optim.epochs=1",
            "optim.warmup_epochs=0", "optim.lr=1e-30", "train.device=cpu", "model.backbone=small_cnn",
            "model.kwargs={widths: [8, 16, 32]}"]
    recipe = load_recipe(CIFAR10_RECIPE, over)
    mod.train_library(recipe, tmp_path / "fast", limit=0)
    fast = torch.load(tmp_path / "fast" / "last.pt", weights_only=False)["model"]
    bundle = build_data(recipe.data, "cpu", seed=recipe.seed)
    model, rows = ref.train_reference(recipe, bundle, torch.device("cpu"), 0,
                                      full_train_labels=mod.full_train_labels(recipe.data))
    assert len(rows) == 1 and rows[0]["images"] == len(bundle.train)
    params = dict(model.named_parameters())
    assert params and all(torch.allclose(fast[k], v.detach(), rtol=0, atol=1e-20) for k, v in params.items())

    counts = bundle.class_counts
    criterion = build_criterion(recipe.loss, recipe.model.num_experts, counts)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 16, 10, generator=gen) * 5
    y_a, y_b, lam = torch.randint(0, 10, (16,), generator=gen), torch.randint(0, 10, (16,), generator=gen), 0.3
    taus = [0.0, 1.0, 2.0]
    prior = ref.official_log_prior(counts)
    official = lam * ref.bs_expert_loss(logits, y_a, prior, taus) + (1 - lam) * ref.bs_expert_loss(logits, y_b, prior,
                                                                                                     taus)
    assert torch.allclose(criterion(logits, mixup_targets(y_a, y_b, lam, 10)), official, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The other scripts: they import (no stale library names) and answer --help; the label-shift rows
# run on the library's selector


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_help(name, load_script, capsys):
    mod = load_script(name)
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_label_shift_rows_run_on_the_library_selector(load_script):
    """Every printed row of benchmarks/label_shift.py on random logits: the library's adaptation
    modes, calibrators and estimators it names exist and return what the row needs."""
    mod = load_script("label_shift")
    mod.check_rows()
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor(lt_class_counts(600, 10, 100))
    v = mod.log_prior(counts, torch.float64).float()
    src_y = torch.arange(10).repeat(30)
    src = torch.randn(len(src_y), 10, generator=gen) + 3.0 * torch.nn.functional.one_hot(src_y, 10)
    y = torch.arange(10).repeat_interleave(torch.arange(30, 0, -3))
    z = torch.randn(len(y), 10, generator=gen) + 3.0 * torch.nn.functional.one_hot(y, 10)
    for row in mod.ROWS:
        sel = mod.TauSelector(counts, calibration=row.calibration, estimator=row.estimator)
        if row.calibration != "none":
            sel.fit_source(src, src_y, source_prior=mod.empirical_prior(src_y, 10))
        zt, yt, tau = mod.run_row(row, sel, z, y, v, draw=0)
        assert zt.shape == (len(yt), 10) and torch.isfinite(zt).all() and isinstance(tau, float), row.key
        if row.mode == "labelled":
            assert len(yt) == len(y) - round(row.labels_per_class * 10)
        else:
            assert torch.equal(yt, y)


def test_fidelity_results_from_an_older_schema_match_at_the_new_defaults(tmp_path, load_script):
    """A result stored before a recipe key existed is reused when the current recipe leaves that key
    at its default, and is a one-line mismatch error naming the key when it does not."""
    mod = load_script("fidelity")
    recipe = load_recipe(CIFAR10_RECIPE)
    current = mod.fingerprint(recipe, 0, "fmnist", torch.device("cpu"), "fast")
    older = json.loads(json.dumps(current))
    del older["recipe"]["data"]["augment"]["cutout"], older["recipe"]["model"]["head_init"]
    assert older != current and mod.canonical(older, "fast") == current
    path = mod.result_path(tmp_path, "fast", 1)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"config": older, "metrics": {"acc": 1.0}}))
    assert mod.load_result(tmp_path, "fast", 1, current)["metrics"] == {"acc": 1.0}
    changed = mod.fingerprint(load_recipe(CIFAR10_RECIPE, ["data.augment.cutout=8"]), 0, "fmnist", torch.device("cpu"),
                              "fast")
    with pytest.raises(BalpoeError, match=r"recipe\.data\.augment\.cutout: 0 vs 8"):
        mod.load_result(tmp_path, "fast", 1, changed)
    older["recipe"]["train"]["mixup_alpha"] = 0.1   # a key the old result has, with another value
    path.write_text(json.dumps({"config": older}))
    with pytest.raises(BalpoeError, match=r"recipe\.train\.mixup_alpha: 0\.1 vs"):
        mod.load_result(tmp_path, "fast", 1, current)


def test_fidelity_fingerprints_hold_what_each_side_runs(load_script):
    """``train.compile: auto`` is ``false`` on a CPU (and its mode then irrelevant); the reference
    side ignores the library's speed settings; the library side does not."""
    mod = load_script("fidelity")
    cpu = torch.device("cpu")

    def fp(side, *over):
        return mod.fingerprint(load_recipe(CIFAR10_RECIPE, list(over)), 0, "fmnist", cpu, side)

    assert load_recipe(CIFAR10_RECIPE).train.compile == "auto"
    assert fp("fast") == fp("fast", "train.compile=false", "train.compile_mode=default")
    assert fp("fast")["recipe"]["train"]["compile"] is False and "compile_mode" not in fp("fast")["recipe"]["train"]
    assert fp("fast") != fp("fast", "train.compile=true")
    assert fp("fast") != fp("fast", "model.batched_experts=false")
    for over in ("model.batched_experts=false", "train.amp=false", "train.channels_last=false", "data.loader=dataloader"):
        assert fp("reference") == fp("reference", over), over
    assert fp("reference") != fp("reference", "train.mixup_alpha=0.2")
    assert fp("reference_seed_mixup") == fp("reference_seed_mixup", "train.amp=false")   # a reference variant
    assert fp("fast_official_mixup") != fp("fast_official_mixup", "train.amp=false")     # a fast variant


def test_official_mixup_stream_gives_the_trainer_the_reference_lambdas(load_script):
    """Inside ``official_mixup_stream`` the trainer's mixup lambdas are the official sequence (numpy
    reset to 0 and the per-class shuffles, then one ``np.random.beta`` per step, continued across
    epochs, whatever the run's seed); the other streams and, after the block, every stream are the
    library's per-seed ones."""
    mod = load_script("fidelity")
    ref = load_script("reference_balpoe")
    from balpoe.runtime.seeding import numpy_stream
    from balpoe.training import trainer
    labels = np.repeat(np.arange(3), [5, 4, 3])
    ref.official_numpy_reset(labels, 3)
    expected = [np.random.beta(0.4, 0.4) for _ in range(6)]
    with mod.official_mixup_stream(labels, 3):
        got = [trainer.numpy_stream(seed, 0, "mixup_lambda").beta(0.4, 0.4) for seed in (1, 2, 3)]
        got += [trainer.numpy_stream(7, epoch, "mixup_lambda").beta(0.4, 0.4) for epoch in (1, 2, 3)]
        order = trainer.numpy_stream(1, 0, "order").random()
    assert got == expected
    assert order == numpy_stream(1, 0, "order").random()
    assert trainer.numpy_stream is numpy_stream
    assert trainer.numpy_stream(1, 0, "mixup_lambda").beta(0.4, 0.4) == numpy_stream(1, 0, "mixup_lambda").beta(0.4, 0.4)


@pytest.mark.parametrize("backbone, steps", [("small_cnn", 5), ("resnet32_cifar", 5)])
def test_library_epoch_takes_the_official_sgd_steps_on_the_same_draws(backbone, steps, monkeypatch, load_script):
    """Given the same batches, mixup lambdas and pairing permutations, the library's training step
    (``train_one_epoch``: ``mixup_batch``, the soft-target loss, timm's SGD from ``build_optimizer``,
    the model's ``param_groups``), NCHW with looped experts, takes the official step's SGD updates
    (``reference_train_epoch``: ``lam * BSExpertLoss(y_a) + (1 - lam) * BSExpertLoss(y_b)``,
    ``torch.optim.SGD``) at the recipe's learning rate, momentum, Nesterov and weight decay, over five
    steps: parameters and BN statistics agree to 1e-9.  Both run in float64: the two loss forms sum in
    different orders, and in float32 ResNet-32 with cosine heads on noise inputs amplifies those
    rounding differences chaotically after a step or two (a ReLU input within rounding of zero flips)."""
    import copy

    from balpoe.models.build import build_model
    from balpoe.training import trainer
    from balpoe.training.build import build_optimizer
    ref = load_script("reference_balpoe")
    # log pi_train: the official divides in float32, the library in float64 and rounds once; they
    # differ by at most one float32 ulp, and the reference is given the library's rounding so that
    # the steps are compared exactly
    counts = torch.tensor([50, 30, 20, 12, 8, 5, 3, 2, 2, 1])
    official_prior = ref.official_log_prior(counts)
    torch.testing.assert_close(official_prior, log_prior(counts), rtol=2 ** -23, atol=0)
    monkeypatch.setattr(ref, "official_log_prior", lambda c, device=None: log_prior(c).to(device))
    kwargs = ["model.kwargs={widths: [8, 16, 32]}"] if backbone == "small_cnn" else []
    recipe = load_recipe(CIFAR10_RECIPE, [f"model.backbone={backbone}", "model.batched_experts=false",
                                          "train.amp=false", "train.channels_last=false", *kwargs])
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(12, 3, 32, 32, generator=gen, dtype=torch.float64), torch.randint(0, 10, (12,), generator=gen))
               for _ in range(4)] + [(torch.randn(5, 3, 32, 32, generator=gen, dtype=torch.float64),
                                      torch.randint(0, 10, (5,), generator=gen))]
    batches = batches[:steps - 1] + batches[-1:]
    torch.manual_seed(0)
    fast = build_model(recipe.model, 10, 3).double()
    official = copy.deepcopy(fast)
    initial = [p.detach().clone() for p in official.parameters()]

    # the library: its lambdas from numpy's global generator, its permutations from a generator seeded 5
    monkeypatch.setattr(trainer, "numpy_stream", lambda *a, **k: np.random.mtrand._rand)
    monkeypatch.setattr(trainer, "torch_stream", lambda *a, **k: torch.Generator().manual_seed(5))
    np.random.seed(0)
    criterion = build_criterion(recipe.loss, recipe.model.num_experts, counts)
    opt = build_optimizer(recipe.optim, fast.param_groups(recipe.optim.lr, recipe.optim.weight_decay))
    stats = trainer.train_one_epoch(fast, batches, criterion, opt, epoch=0, seed=1, num_classes=10, mixup_alpha=0.8)
    # the official step: the same lambdas (numpy reseeded) and permutations (torch's global RNG seeded 5)
    np.random.seed(0)
    torch.manual_seed(5)
    ref_stats = ref.reference_train_epoch(official, batches, counts, [0.0, 1.0, 2.0],
                                          ref.reference_optimizer(official, recipe), torch.device("cpu"), 0.8)
    assert stats["images"] == ref_stats["images"] == 12 * (steps - 1) + 5
    assert stats["loss"] == pytest.approx(ref_stats["loss"], rel=1e-6)   # the epoch loss is summed in float32
    state_fast, state_ref = fast.state_dict(), official.state_dict()
    for k, v in state_ref.items():
        torch.testing.assert_close(state_fast[k], v, rtol=1e-9, atol=1e-10, msg=k)
    assert max((p1 - p0).abs().max().item() for p0, p1 in zip(initial, official.parameters())) > 1e-3   # they moved


def test_fidelity_stream_matched_comparison_is_the_2x2_design(load_script):
    """With the two diagnostic sides present, ``stream_matched`` holds library - reference for each
    lambda stream (Welch), their mean with SE sqrt(se_1² + se_2²) / 2, and the stream effect."""
    mod = load_script("fidelity")
    accs = {"fast": [83.0, 84.0, 85.0], "reference": [85.0, 86.0], "reference_seed_mixup": [84.0, 84.5, 85.5],
            "fast_official_mixup": [84.0, 86.0]}
    runs = {side: {str(i): {"metrics": {m: (v if m == "acc" else None) for m in mod.METRICS}} for i, v in enumerate(vals)}
            for side, vals in accs.items()}
    out = mod.summarise(runs)["stream_matched"]["acc"]

    def welch(a, b):
        return (np.mean(a) - np.mean(b), math.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b)))
    (d1, s1), (d2, s2) = welch(accs["fast"], accs["reference_seed_mixup"]), welch(accs["fast_official_mixup"],
                                                                                  accs["reference"])
    assert out["per_seed"]["diff"] == pytest.approx(d1) and out["per_seed"]["se"] == pytest.approx(s1)
    assert out["official"]["diff"] == pytest.approx(d2) and out["official"]["se"] == pytest.approx(s2)
    assert out["combined"]["diff"] == pytest.approx((d1 + d2) / 2)
    assert out["combined"]["se"] == pytest.approx(math.sqrt(s1 ** 2 + s2 ** 2) / 2)
    assert out["combined"]["within_2se"] == (abs(d1 + d2) / 2 <= math.sqrt(s1 ** 2 + s2 ** 2))
    (e1, _), (e2, _) = welch(accs["fast_official_mixup"], accs["fast"]), welch(accs["reference"],
                                                                               accs["reference_seed_mixup"])
    assert out["stream_effect"]["diff"] == pytest.approx((e1 + e2) / 2)
    assert "stream_matched" not in mod.summarise({k: runs[k] for k in ("fast", "reference")})
