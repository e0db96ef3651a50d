#!/usr/bin/env bash
# gpu_suite.sh -- the GPU benchmark suite: speed levers + profile, the 200-epoch BalPoE run,
# fast-vs-reference accuracy (fidelity.py), torchrun with NCCL, in stages that each fit in 10 minutes (H100).
# What: s/epoch, img/s, peak memory and the speed-up vs the official-style reference per speed lever,
# with a torch.profiler breakdown (GPU busy fraction, kernels and launches per step); the wall time
# of a full 200-epoch `python -m balpoe train` of CIFAR-100-LT IR100 BalPoE (ResNet-32 x 3) on
# synthetic data, tuned, against a 60 s target; balanced accuracy of the fast path vs the reference
# (Fashion-MNIST-LT, 2 seeds); the library under torchrun and an NCCL DDP + SyncBatchNorm check.
# How: each step under `timeout` inside one time budget per invocation (GPU_SUITE_BUDGET seconds,
# default 540), so logs and partial JSON are written even when a step overruns.
#
#   bash benchmarks/gpu_suite.sh speed          # versions; speed levers + reference + per-lever profile;
#                                               # then the fastest lever's settings again, longer, profiled
#   bash benchmarks/gpu_suite.sh e2e            # full 200-epoch `python -m balpoe train` of the CIFAR-100-LT
#                                               # IR100 recipe on synthetic data, tuned; plus the recipe as is
#   bash benchmarks/gpu_suite.sh accuracy ddp   # fast vs reference accuracy, fidelity.py (Fashion-MNIST-LT, 2 seeds);
#                                               # torchrun --nproc_per_node 1 (sync_bn on) + an NCCL DDP check
#   GPU_SUITE_SMOKE=1 bash benchmarks/gpu_suite.sh all   # tiny CPU sizes: checks this script, not the speed
#
# Writes STAGE.log and STAGE.json per stage to "${OUT:-runs/gpu_suite}" (8 files for all four stages;
# GPU_SUITE_TRACE=1 adds speed_trace.json.gz, the best setting's chrome trace).  Run from anywhere: it
# works in the repository root.  Needs balpoe installed from this checkout (`pip install -e .`; without
# network: `pip install -e . --no-deps --no-build-isolation`) and python3 with torch, torchvision,
# timm, einops, rich, numpy, pyyaml.  'accuracy' reads the Fashion-MNIST IDX files the library's way
# (data.root, $BALPOE_DATA, /usr/share/datasets/fashion-mnist); GPU_SUITE_FMNIST_ROOT=DIR points it
# at DIR.
#
# Knobs (environment): GPU_SUITE_E2E_EPOCHS (default: the recipe's 200), GPU_SUITE_E2E_RECIPE_EPOCHS
# (20), GPU_SUITE_E2E_TARGET (60 s), GPU_SUITE_ACC_EPOCHS (20), GPU_SUITE_ACC_RECIPE, GPU_SUITE_ACC_SET /
# GPU_SUITE_E2E_SET / GPU_SUITE_SPEED_EXTRA (extra space-separated KEY=VALUE overrides / speed.py
# flags), GPU_SUITE_BUDGET (seconds per invocation), PYTHON (default python3).
set -euo pipefail
export PYTHONUNBUFFERED=1

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR="${OUT:-runs/gpu_suite}"
PY="${PYTHON:-python3}"
SMOKE="${GPU_SUITE_SMOKE:-0}"
BUDGET="${GPU_SUITE_BUDGET:-$([[ "$SMOKE" == 1 ]] && echo 1500 || echo 540)}"
E2E_TARGET="${GPU_SUITE_E2E_TARGET:-60}"
CIFAR_RECIPE=recipes/balpoe/cifar100_lt_ir100.yaml

mkdir -p "$OUT_DIR"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
STEPS="$WORK/steps.tsv"
: > "$STEPS"

# The suite measures this checkout: balpoe must be installed from this repository (checked from
# another directory, so that the current one does not make it importable by accident).
PY_PATH="$(command -v "$PY")" || { echo "error: python '$PY' not found (set PYTHON)" >&2; exit 2; }
[[ "$PY_PATH" == /* ]] || PY_PATH="$PWD/$PY_PATH"
if ! BALPOE_AT="$(cd "$WORK" && "$PY_PATH" -c \
    'import balpoe, os; print(os.path.dirname(os.path.dirname(os.path.abspath(balpoe.__file__))))')"; then
  echo "error: balpoe is not installed for $PY; run 'pip install -e .' in $PWD first" \
       "(without network: pip install -e . --no-deps --no-build-isolation)" >&2
  exit 2
fi
if [[ "$(cd "$BALPOE_AT" && pwd -P)" != "$(pwd -P)" ]]; then
  echo "error: $PY imports balpoe from $BALPOE_AT, not from this checkout ($PWD); run 'pip install -e .' here" >&2
  exit 2
fi

read -ra SPEED_EXTRA <<< "${GPU_SUITE_SPEED_EXTRA:-}"
ACC_SET=(); for kv in ${GPU_SUITE_ACC_SET:-}; do ACC_SET+=(--set "$kv"); done
E2E_SET=(); for kv in ${GPU_SUITE_E2E_SET:-}; do E2E_SET+=(--set "$kv"); done

if [[ "$SMOKE" == 1 ]]; then   # CPU, tiny: proves the plumbing in about two minutes on 2 cores
  TINY=(--set model.backbone=small_cnn --set "model.kwargs={widths: [8, 16, 32]}")
  SPEED_BASE=(--device cpu --threads 2 --limit 256 --set optim.batch_size=64 "${TINY[@]}")
  LEVER_ARGS=(--epochs 1 --warmup-epochs 0 --ref-workers 1 --profile 3 --skip-levers compile)
  BEST_ARGS=(--epochs 1 --warmup-epochs 0 --profile 3)
  TEST_PER_CLASS=2
  E2E_EPOCHS="${GPU_SUITE_E2E_EPOCHS:-2}"; E2E_RECIPE_EPOCHS="${GPU_SUITE_E2E_RECIPE_EPOCHS:-2}"
  RUN_SMALL=(--set train.device=cpu --set train.threads=2 --set train.channels_last=false "${TINY[@]}")
  E2E_COMPILE=false
  ACC_RECIPE="${GPU_SUITE_ACC_RECIPE:-recipes/balpoe/fashion_mnist_lt_ir100_cpu_demo.yaml}"
  ACC_EPOCHS="${GPU_SUITE_ACC_EPOCHS:-1}"; ACC_WORKERS=1
  DDP_EPOCHS=2
  CAP_LEVERS=300; CAP_BEST=120; CAP_E2E=300; CAP_E2E_RECIPE=200; CAP_ACC=420; CAP_DDP=200; CAP_NCCL=120
else
  SPEED_BASE=()
  LEVER_ARGS=(--epochs 2 --warmup-epochs 1 --ref-workers 4 --profile 20)
  BEST_ARGS=(--epochs 5 --warmup-epochs 1 --profile 30)
  TEST_PER_CLASS=100   # the real CIFAR-100 test-set size: the final evaluation costs what it will
  E2E_EPOCHS="${GPU_SUITE_E2E_EPOCHS:-}"; E2E_RECIPE_EPOCHS="${GPU_SUITE_E2E_RECIPE_EPOCHS:-20}"
  RUN_SMALL=()
  E2E_COMPILE=true
  ACC_RECIPE="${GPU_SUITE_ACC_RECIPE:-recipes/balpoe/fashion_mnist_lt_ir100.yaml}"
  ACC_EPOCHS="${GPU_SUITE_ACC_EPOCHS:-20}"; ACC_WORKERS=4
  DDP_EPOCHS=3
  CAP_LEVERS=300; CAP_BEST=180; CAP_E2E=360; CAP_E2E_RECIPE=120; CAP_ACC=330; CAP_DDP=90; CAP_NCCL=60
fi

# run_step STAGE LABEL CAP CMD...: run CMD under `timeout` (CAP seconds, less if the budget is nearly
# spent), log its wall time and exit status to the log and $STEPS; never stops the stage.
run_step() {
  local stage=$1 label=$2 cap=$3; shift 3
  local left=$((BUDGET - SECONDS - 15))
  local limit=$((cap < left ? cap : left))
  if ((limit < 20)); then
    echo "== $label: SKIPPED, only ${left}s of the ${BUDGET}s budget left"
    printf '%s\t%s\t%s\t%s\t%s\n' "$stage" "$label" skipped 0 0 >> "$STEPS"
    return 0
  fi
  echo "== $label (limit ${limit}s): $*"
  local start rc=0
  start=$(date +%s.%N)
  timeout --kill-after=15 "$limit" "$@" || rc=$?
  local wall
  wall=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  if ((rc == 124 || rc == 137)); then
    echo "== $label: TIMED OUT after ${wall}s (limit ${limit}s)"
  else
    echo "== $label: exit $rc after ${wall}s"
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$stage" "$label" "$rc" "$wall" "$limit" >> "$STEPS"
  return 0
}

has_cuda() { "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; }

# ------------------------------------------------------------------------------------------------

stage_speed() {
  echo "== stage speed, $(date -u +%FT%TZ), smoke=$SMOKE"
  if command -v nvidia-smi > /dev/null; then nvidia-smi || true; else echo "(nvidia-smi not available)"; fi
  "$PY" - "$WORK/versions.json" <<'EOF' || echo "== versions: FAILED"
import json, platform, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "cuda_available": torch.cuda.is_available(),
        "cpu_count": __import__("os").cpu_count()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count)
from importlib.metadata import PackageNotFoundError, version
for dist in ("timm", "torchvision", "einops", "rich", "numpy", "pyyaml", "triton"):
    try:
        info[dist] = version(dist)
    except PackageNotFoundError:
        info[dist] = "missing"
print(json.dumps(info, indent=1))
json.dump(info, open(sys.argv[1], "w"))
EOF
  run_step speed levers "$CAP_LEVERS" "$PY" benchmarks/speed.py --synthetic --levers --reference \
    "${LEVER_ARGS[@]}" ${SPEED_BASE[@]+"${SPEED_BASE[@]}"} ${SPEED_EXTRA[@]+"${SPEED_EXTRA[@]}"} \
    --json "$WORK/levers.json"
  # The fastest lever's settings, again: more timed epochs and a longer profile (and the trace).
  local best=()
  if [[ -f "$WORK/levers.json" ]]; then
    read -ra best <<< "$("$PY" - "$WORK/levers.json" <<'EOF'
import json, sys
st = json.load(open(sys.argv[1]))["modes"]["fast"]["settings"]
flags = (["--amp"] if st["amp_bf16"] else []) + (["--channels-last"] if st["channels_last"] else [])
if st["compile"]:
    flags += ["--compile", "--compile-mode", st["compile_mode"] or "default"]
if st.get("batched_experts") is not None:
    flags += ["--set", f"model.batched_experts={str(st['batched_experts']).lower()}"]
print(" ".join(flags))
EOF
)"
    local trace=()
    [[ "${GPU_SUITE_TRACE:-0}" == 1 ]] && trace=(--trace "$OUT_DIR/speed_trace.json.gz")
    echo "== best lever's flags: ${best[*]:-(none: eager fp32)}"
    run_step speed best "$CAP_BEST" "$PY" benchmarks/speed.py --synthetic ${best[@]+"${best[@]}"} \
      "${BEST_ARGS[@]}" ${trace[@]+"${trace[@]}"} ${SPEED_BASE[@]+"${SPEED_BASE[@]}"} \
      ${SPEED_EXTRA[@]+"${SPEED_EXTRA[@]}"} --json "$WORK/best.json"
  else
    echo "== best: SKIPPED (the levers run wrote no JSON)"
  fi
  "$PY" - "$WORK" "$OUT_DIR/speed.json" <<'EOF' || echo "== speed.json: FAILED"
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
load = lambda n: json.loads((work / n).read_text()) if (work / n).is_file() else None  # noqa: E731
steps = [dict(zip(("stage", "step", "rc", "wall_s", "limit_s"), l.split("\t")))
         for l in (work / "steps.tsv").read_text().splitlines()]
res = {"stage": "speed", "versions": load("versions.json"), "steps": [s for s in steps if s["stage"] == "speed"],
       "levers": load("levers.json"), "best": load("best.json")}
out.write_text(json.dumps(res, indent=1) + "\n")
lev, best = res["levers"], res["best"]
print("== speed summary")
if lev:
    if lev.get("partial"):
        print("  (partial: the levers run stopped before its last lever)")
    for r in lev["levers"]:
        ref = r.get("speedup_vs_reference")
        print(f"  {r['lever']:<32} {r['s_per_epoch']:8.3f} s/epoch {r['img_per_s']:10,.0f} img/s"
              + (f"  {ref:6.2f}x vs reference" if ref else ""))
    if lev["modes"].get("reference"):
        print(f"  reference: {lev['modes']['reference']['s_per_epoch']:.3f} s/epoch")
if best:
    f = best["modes"]["fast"]
    p = f.get("profile") or {}
    print(f"  best settings, {best['epochs']} timed epochs: {f['s_per_epoch']:.3f} s/epoch; "
          f"{best['recipe_epochs']} epochs -> {f['projected_run_s'] or float('nan'):.1f} s of training steps")
    if "gpu_busy_fraction" in p:
        print(f"  profile: {p['wall_ms_per_step']:.2f} ms/step, kernels {p['kernel_ms_per_step']:.2f} ms/step, "
              f"GPU busy {p['gpu_busy_fraction']:.0%}, {p['kernels_per_step']:.0f} kernels/step, "
              f"{p['launch_calls_per_step']:.0f} launch calls/step, "
              f"{p['graph_launches_per_step']:.1f} graph launches/step")
print(f"  -> {out}")
EOF
}

# ------------------------------------------------------------------------------------------------

write_synthetic() {  # write_synthetic STAGE DIR
  [[ -d "$2/cifar-100-python" ]] && return 0
  run_step "$1" write_synthetic 120 "$PY" benchmarks/speed.py --write-synthetic "$2" \
    --synthetic-test-per-class "$TEST_PER_CLASS"
}

stage_e2e() {
  echo "== stage e2e, $(date -u +%FT%TZ), smoke=$SMOKE"
  local syn="$WORK/synthetic"
  write_synthetic e2e "$syn"
  local data=(--set "data.root=$syn" --set data.download=false)
  local epochs=()
  [[ -n "$E2E_EPOCHS" ]] && epochs=(--set "optim.epochs=$E2E_EPOCHS")
  [[ "$SMOKE" == 1 ]] && epochs+=(--set optim.warmup_epochs=1)
  local tuned=(--set "train.compile=$E2E_COMPILE" --set model.batched_experts=true
               --set train.compile_mode=reduce-overhead)
  echo "== e2e tuned overrides: ${tuned[*]} ${E2E_SET[*]:-}"
  run_step e2e tuned "$CAP_E2E" "$PY" -m balpoe train "$CIFAR_RECIPE" "${data[@]}" ${epochs[@]+"${epochs[@]}"} \
    "${tuned[@]}" ${RUN_SMALL[@]+"${RUN_SMALL[@]}"} ${E2E_SET[@]+"${E2E_SET[@]}"} \
    --out "$WORK/e2e_tuned" --no-progress
  local recipe_epochs=(--set "optim.epochs=$E2E_RECIPE_EPOCHS")
  [[ "$SMOKE" == 1 ]] && recipe_epochs+=(--set optim.warmup_epochs=1)
  run_step e2e recipe_as_is "$CAP_E2E_RECIPE" "$PY" -m balpoe train "$CIFAR_RECIPE" "${data[@]}" \
    "${recipe_epochs[@]}" ${RUN_SMALL[@]+"${RUN_SMALL[@]}"} --out "$WORK/e2e_recipe" --no-progress
  "$PY" - "$WORK" "$OUT_DIR/e2e.json" "${tuned[*]} ${E2E_SET[*]:-}" "$E2E_TARGET" <<'EOF' || echo "== e2e.json: FAILED"
import json, statistics, sys
from pathlib import Path
import yaml
work, out, tuned, target = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
steps = {s[1]: s for s in (l.split("\t") for l in (work / "steps.tsv").read_text().splitlines()) if s[0] == "e2e"}

def run(name, step):
    d = work / name
    m = d / "metrics.jsonl"
    rows = [json.loads(l) for l in m.read_text().splitlines()] if m.is_file() else []
    recipe = (d / "recipe.yaml").read_text() if (d / "recipe.yaml").is_file() else ""
    r = yaml.safe_load(recipe) if recipe else {}
    planned = (r.get("optim") or {}).get("epochs")
    times = [row["epoch_time_s"] for row in rows]
    steady = statistics.median(times[1:]) if len(times) > 1 else (times[0] if times else None)
    s = steps.get(step, [None] * 5)
    ev = json.loads((d / "eval.json").read_text()) if (d / "eval.json").is_file() else {}
    return {"epochs_planned": planned, "epochs_done": len(rows), "process_wall_s": float(s[3]) if s[3] else None,
            "exit": s[2], "train_s_sum": sum(times) if times else None,
            "first_epoch_s": times[0] if times else None, "steady_s_per_epoch": steady,
            "steady_img_per_s": statistics.median([row["img_per_s"] for row in rows[1:]]) if len(rows) > 1 else None,
            "projected_train_s": (times[0] + (planned - 1) * steady) if (times and planned) else None,
            "final_loss": rows[-1]["loss"] if rows else None, "test_acc": ev.get("acc"),
            "recipe_settings": {k: (r.get("train") or {}).get(k)
                                for k in ("device", "amp", "channels_last", "compile", "compile_mode")}
                               | {"batched_experts": (r.get("model") or {}).get("batched_experts")}}

res = {"stage": "e2e", "data": "SYNTHETIC CIFAR-100-LT IR100 (10,847 train images): speed only, accuracy meaningless",
       "tuned_overrides": tuned.split(), "tuned": run("e2e_tuned", "tuned"),
       "recipe_as_is": run("e2e_recipe", "recipe_as_is"),
       "steps": [dict(zip(("stage", "step", "rc", "wall_s", "limit_s"), s)) for s in steps.values()]}
t = res["tuned"]
done = bool(t["epochs_done"]) and t["epochs_done"] == t["epochs_planned"]
res["target_s"] = target
res["tuned_train_s_le_target"] = bool(done and t["train_s_sum"] <= target)
res["tuned_process_wall_s_le_target"] = bool(done and t["process_wall_s"] is not None and t["process_wall_s"] <= target)
out.write_text(json.dumps(res, indent=1) + "\n")
print("== e2e summary (process wall = python start .. final eval; train = sum of the epochs' times)")
for k in ("tuned", "recipe_as_is"):
    r = res[k]
    f = lambda v, fmt: format(v, fmt) if v is not None else "-"  # noqa: E731
    print(f"  {k:<13} exit {r['exit']}: {r['epochs_done']}/{r['epochs_planned']} epochs, process wall "
          f"{f(r['process_wall_s'], '.1f')} s, train {f(r['train_s_sum'], '.1f')} s (first epoch "
          f"{f(r['first_epoch_s'], '.1f')} s, then {f(r['steady_s_per_epoch'], '.3f')} s/epoch); "
          f"{r['epochs_planned']} epochs projected {f(r['projected_train_s'], '.1f')} s")
print(f"  tuned run within {res['target_s']:g} s: training epochs {res['tuned_train_s_le_target']}, "
      f"whole process {res['tuned_process_wall_s_le_target']}")
print(f"  -> {out}")
EOF
}

# ------------------------------------------------------------------------------------------------

stage_accuracy() {
  echo "== stage accuracy, $(date -u +%FT%TZ), smoke=$SMOKE"
  local data=()
  if [[ -n "${GPU_SUITE_FMNIST_ROOT:-}" ]]; then data=(--set "data.root=$GPU_SUITE_FMNIST_ROOT")
  else echo "== accuracy: Fashion-MNIST from the recipe's data.root, \$BALPOE_DATA or /usr/share/datasets"; fi
  local small=()
  [[ "$SMOKE" == 1 ]] && small=(--set train.threads=2 --set "model.kwargs={widths: [8, 16, 32]}")
  run_step accuracy fidelity "$CAP_ACC" "$PY" benchmarks/fidelity.py "$ACC_RECIPE" \
    --epochs "$ACC_EPOCHS" --seeds 0 1 --workers "$ACC_WORKERS" ${data[@]+"${data[@]}"} \
    --set optim.schedule=cosine ${small[@]+"${small[@]}"} ${ACC_SET[@]+"${ACC_SET[@]}"} \
    --out "$WORK/fidelity" --json "$WORK/accuracy.json"
  "$PY" - "$WORK" "$OUT_DIR/accuracy.json" "$ACC_RECIPE" <<'EOF' || echo "== accuracy.json: FAILED"
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
steps = [dict(zip(("stage", "step", "rc", "wall_s", "limit_s"), l.split("\t")))
         for l in (work / "steps.tsv").read_text().splitlines() if l.startswith("accuracy\t")]
acc = json.loads((work / "accuracy.json").read_text()) if (work / "accuracy.json").is_file() else None
out.write_text(json.dumps({"stage": "accuracy", "recipe_file": sys.argv[3],
                           "note": "schedule compressed: optim.epochs=--epochs, cosine (both paths alike)",
                           "steps": steps, "result": acc}, indent=1) + "\n")
if acc:
    d = acc.get("difference") or {}
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    parts = [f"{k} {f(d[k]['diff'], '+.2f')} (Welch SE {f(d[k]['se'], '.2f')}, within 2 SE: {d[k]['within_2se']})"
             for k in ("acc", "ece", "nll", "sade_mean") if k in d]
    print(f"== accuracy summary: {acc['recipe_name']}, {acc['epochs']} epochs, seeds {acc['seeds']}: fast - reference "
          + ("; ".join(parts) or "not computed (missing runs)"))
print(f"  -> {out}")
EOF
}

# ------------------------------------------------------------------------------------------------

stage_ddp() {
  echo "== stage ddp, $(date -u +%FT%TZ), smoke=$SMOKE"
  local syn="$WORK/synthetic"
  write_synthetic ddp "$syn"
  # 1. the library under torchrun: one process (WORLD_SIZE=1 is the library's single-process path).
  run_step ddp torchrun_sync_bn "$CAP_DDP" "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
    -m balpoe train "$CIFAR_RECIPE" --set "data.root=$syn" --set data.download=false \
    --set "optim.epochs=$DDP_EPOCHS" --set optim.warmup_epochs=1 --set train.sync_bn=true \
    ${RUN_SMALL[@]+"${RUN_SMALL[@]}"} --out "$WORK/ddp" --no-progress
  # 2. NCCL itself: a process group, an all_reduce, DDP + SyncBatchNorm around the BalPoE model, 2 epochs.
  if has_cuda; then
    cat > "$WORK/nccl_check.py" <<'EOF'
import json, os, sys, time
import torch
import torch.distributed as td
import torch.nn as nn
from balpoe.data.build import build_data, build_loader
from balpoe.losses.build import build_criterion
from balpoe.models.build import build_model
from balpoe.recipe import load_recipe
from balpoe.training.build import build_optimizer
from balpoe.training.trainer import train_one_epoch

out, recipe_path, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
local = int(os.environ["LOCAL_RANK"])
device = torch.device("cuda", local)
torch.cuda.set_device(device)
td.init_process_group("nccl")
rank, world = td.get_rank(), td.get_world_size()
t = torch.full((1,), float(rank + 1), device=device)
td.all_reduce(t)
recipe = load_recipe(recipe_path, overrides)
torch.manual_seed(recipe.seed)
bundle = build_data(recipe.data, device, seed=recipe.seed)
loader = build_loader(bundle, "train", recipe.optim.batch_size // world, recipe.data, train=True, seed=recipe.seed,
                      rank=rank, world_size=world, channels_last=True)
model = build_model(recipe.model, bundle.num_classes, bundle.in_chans).to(device).to(memory_format=torch.channels_last)
model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
ddp = nn.parallel.DistributedDataParallel(model, device_ids=[local])
criterion = build_criterion(recipe, bundle.class_counts).to(device)
optimizer = build_optimizer(recipe.optim, model.param_groups(recipe.optim.lr, recipe.optim.weight_decay))
epochs = []
for epoch in range(2):
    loader.set_epoch(epoch)
    ddp.train()
    start = time.perf_counter()
    stats = train_one_epoch(ddp, loader, criterion, optimizer, epoch=epoch, seed=recipe.seed,
                            num_classes=bundle.num_classes, mixup_alpha=recipe.train.mixup_alpha, amp=True)
    epochs.append({"epoch": epoch + 1, "loss": stats["loss"], "seconds": time.perf_counter() - start})
    print(f"rank {rank}: epoch {epoch + 1} loss {stats['loss']:.4f} in {epochs[-1]['seconds']:.2f} s", flush=True)
n_sync = sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
if rank == 0:
    json.dump({"backend": td.get_backend(), "world_size": world, "all_reduce": t.item(),
               "sync_batchnorm_layers": n_sync, "epochs": epochs}, open(out, "w"))
    print(f"NCCL ok: backend {td.get_backend()}, world {world}, all_reduce {t.item()}, {n_sync} SyncBatchNorm layers")
td.destroy_process_group()
EOF
    run_step ddp nccl_ddp_syncbn "$CAP_NCCL" "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
      "$WORK/nccl_check.py" "$WORK/nccl.json" "$CIFAR_RECIPE" "data.root=$syn" data.download=false
  else
    echo "== nccl_ddp_syncbn: SKIPPED (no CUDA device)"
  fi
  "$PY" - "$WORK" "$OUT_DIR/ddp.json" <<'EOF' || echo "== ddp.json: FAILED"
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
steps = [dict(zip(("stage", "step", "rc", "wall_s", "limit_s"), l.split("\t")))
         for l in (work / "steps.tsv").read_text().splitlines() if l.startswith("ddp\t")]
m = work / "ddp" / "metrics.jsonl"
rows = [json.loads(l) for l in m.read_text().splitlines()] if m.is_file() else []
ev = work / "ddp" / "eval.json"
nccl = work / "nccl.json"
res = {"stage": "ddp", "note": "torchrun --nproc_per_node 1: WORLD_SIZE=1 runs the library's single-process path "
                               "(no process group); nccl_check builds an NCCL group + DDP + SyncBatchNorm itself",
       "steps": steps, "torchrun_epochs": rows,
       "torchrun_eval_acc": json.loads(ev.read_text())["acc"] if ev.is_file() else None,
       "nccl_check": json.loads(nccl.read_text()) if nccl.is_file() else None}
out.write_text(json.dumps(res, indent=1) + "\n")
print(f"== ddp summary: torchrun run {len(rows)} epochs, eval {'written' if ev.is_file() else 'MISSING'}; "
      f"NCCL check {'ok' if res['nccl_check'] else 'not run / failed'}")
print(f"  -> {out}")
EOF
}

# ------------------------------------------------------------------------------------------------

STAGES=("$@")
if ((${#STAGES[@]} == 0)); then
  echo "usage: bash benchmarks/gpu_suite.sh STAGE [STAGE ...]   (speed | e2e | accuracy | ddp | all)" >&2
  exit 2
fi
[[ "${STAGES[*]}" == all ]] && STAGES=(speed e2e accuracy ddp)
for s in "${STAGES[@]}"; do
  case "$s" in
    speed|e2e|accuracy|ddp) ;;
    *) echo "error: unknown stage '$s' (speed, e2e, accuracy, ddp, all)" >&2; exit 2;;
  esac
done
for s in "${STAGES[@]}"; do
  "stage_$s" 2>&1 | tee "$OUT_DIR/$s.log"
done
echo "== steps (stage, step, exit, wall s, limit s); total ${SECONDS}s of the ${BUDGET}s budget"
column -t -s $'\t' "$STEPS" 2>/dev/null || cat "$STEPS"
echo "== files in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
! awk -F'\t' '$3 != "0" { bad = 1 } END { exit !bad }' "$STEPS"
