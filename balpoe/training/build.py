"""Recipe -> :class:`~balpoe.training.trainer.Plan` -> a trained run: ``balpoe train RECIPE``.

:func:`train` reads top to bottom: devices and processes, every input, the output directory, the
data, the plan (model, loss, optimizer, schedule for the recipe's stage), then the stage-agnostic
loop (:func:`~balpoe.training.trainer.train_model`), the final evaluation
(:func:`~balpoe.evaluate.build.evaluate_model`) and the run's results (:func:`write_results`).
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from torch.optim import lr_scheduler

from balpoe.data.build import build_data, build_loader, input_size
from balpoe.data.autoaugment import parse_randaugment
from balpoe.data.bundle import DataBundle
from balpoe.data.decode import open_image
from balpoe.data.lt import empty_group_hint
from balpoe.errors import BalpoeError, NoRunToResume, RunExists, UnfinishedRun, short_path, shown
from balpoe.evaluate.build import ensemble_prior, evaluate_model, validation_metrics, write_run_report
from balpoe.evaluate.report import print_report
from balpoe.data.registry import get_dataset
from balpoe.losses.build import build_criterion, check_loss, expert_taus, get_loss_entry
from balpoe.losses.priors import warn_unbalanced_tau
from balpoe.models.build import build_model
from balpoe.models.build import check_backbone
from balpoe.models.weights import load_state, read_weights
from balpoe.recipe import Recipe, flat_keys, recipe_from_dict
from balpoe.runtime import distributed as dist
from balpoe.runtime.checkpoint import ensure_writable_dir, load_checkpoint, remove_stale_temporaries, write_json
from balpoe.runtime.files import RUN_FILES, RunLock
from balpoe.runtime.console import console
from balpoe.runtime.device import auto_threads, resolve_device
from balpoe.runtime.precision import amp_dtype
from balpoe.training.stage2 import adopt_stage1_sections, check_stage2_data, prepare_stage2, set_stage2_mode
from balpoe.training.tensorboard import TensorBoardLogger
from balpoe.training.trainer import Plan, add_test_curve, train_model


def build_optimizer(cfg, param_groups) -> torch.optim.Optimizer:
    """SGD with momentum (Nesterov by default) and weight decay on all parameters (official code),
    through timm's optimizer factory; ``cfg`` is the recipe's ``optim`` section."""
    return create_optimizer_v2(param_groups, opt="sgd" if cfg.nesterov else "momentum", lr=cfg.lr,
                               weight_decay=cfg.weight_decay, momentum=cfg.momentum, filter_bias_and_bn=False)


def build_scheduler(cfg, optimizer: torch.optim.Optimizer):
    """Per-epoch schedule of the ``optim`` section: linear warmup ``lr * (e + 1) / W`` for ``e < W``
    (official BalPoE), then multistep (x gamma at each milestone epoch), cosine to ``min_lr`` or
    constant."""
    w = cfg.warmup_epochs
    if cfg.schedule == "multistep":
        main = lr_scheduler.MultiStepLR(optimizer, [m - w for m in cfg.milestones], cfg.gamma)
    elif cfg.schedule == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs - w, eta_min=cfg.min_lr)
    else:
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if w == 0:
        return main
    warm = lr_scheduler.LinearLR(optimizer, start_factor=1.0 / w, end_factor=1.0, total_iters=max(w - 1, 1))
    return lr_scheduler.SequentialLR(optimizer, [warm, main], milestones=[w])


def load_init_checkpoint(path: str | None) -> tuple[dict, Recipe]:
    """The stage-1 checkpoint named by ``stage2.init_checkpoint`` and its recipe; every failure is a
    one-line :class:`BalpoeError` naming the key and the path."""
    key = "recipe key 'stage2.init_checkpoint'"
    if not path:
        raise BalpoeError(f"{key} is required when stage is 2 (the stage-1 run's last.pt)")
    try:
        ckpt = load_checkpoint(path)
    except BalpoeError as e:
        raise BalpoeError(f"{key}: {e} (train stage 1 first, or set stage2.init_checkpoint to its last.pt)") from None
    try:
        stage1 = recipe_from_dict(ckpt["recipe"])
    except (BalpoeError, KeyError, TypeError) as e:
        raise BalpoeError(f"{key}: checkpoint '{path}' holds no valid recipe ({e})") from None
    if stage1.stage != 1:
        raise BalpoeError(f"{key}: '{path}' is a stage-{stage1.stage} checkpoint; point it at a stage-1 run's last.pt")
    return ckpt, stage1


def resolve_stage2(recipe: Recipe, bundle: DataBundle, loaded: tuple[dict, Recipe] | None = None
                   ) -> tuple[Recipe, dict]:
    """MiSLAS stage 2: the recipe with the stage-1 checkpoint's ``model`` and ``loss`` sections
    (:func:`~balpoe.training.stage2.adopt_stage1_sections`, a new recipe) and that checkpoint; the data
    are checked against it (:func:`~balpoe.training.stage2.check_stage2_data`).  ``loaded``: the
    checkpoint and recipe :func:`load_init_checkpoint` returned (read here otherwise)."""
    path = recipe.stage2.init_checkpoint
    init, stage1 = loaded if loaded is not None else load_init_checkpoint(path)
    resolved, taken = adopt_stage1_sections(recipe, stage1, path)
    check_stage2_data(resolved.data.sampler, bundle.num_classes, bundle.in_chans, bundle.class_counts.tolist(),
                      init, path)
    if taken and dist.rank() == 0:
        console.print(f"stage 2: {' and '.join(taken)} section{'s' if len(taken) > 1 else ''} taken from the "
                      f"stage-1 checkpoint '{path}' (backbone {resolved.model.backbone}, "
                      f"{resolved.model.num_experts} expert(s), {resolved.model.head} head)")
    return resolved, init


def build_plan(recipe: Recipe, bundle: DataBundle, device: torch.device, *, rank: int = 0,
               world_size: int = 1, init: tuple[dict, Recipe] | None = None) -> Plan:
    """The :class:`~balpoe.training.trainer.Plan` of ``recipe``'s stage.

    Stage 1: the recipe's model and loss.  Stage 2 (MiSLAS): the stage-1 checkpoint's network with
    its weights, Eq. 4 heads, a frozen backbone, shifted BN and the label-aware smoothing loss
    (``init``: that checkpoint as :func:`load_init_checkpoint` returned it, else it is read here)."""
    tc = recipe.train
    loader = build_loader(bundle, "train", dist.local_batch_size(recipe.optim.batch_size, world_size), recipe.data,
                          train=True, seed=recipe.seed, rank=rank, world_size=world_size,
                          channels_last=tc.channels_last)
    if recipe.stage == 1:
        model = build_model(recipe.model, bundle.num_classes, bundle.in_chans)
        taus = expert_taus(recipe.loss, recipe.model.num_experts)
        if rank == 0 and (recipe.model.num_experts > 1 or taus != [0.0]):
            warn_unbalanced_tau(taus)
        delta_lr_factor = 1.0

        def set_train_mode(m: nn.Module) -> None:
            m.train()  # the model's own train(): a frozen trunk (model.trainable) stays in eval mode
    else:
        recipe, init = resolve_stage2(recipe, bundle, init)
        model = build_model(recipe.model, init["num_classes"], init["in_chans"], pretrained=False)
        load_state(model, init["model"], f"recipe key 'stage2.init_checkpoint': the weights in "
                   f"'{recipe.stage2.init_checkpoint}' do not fit its own model section")
        prepare_stage2(model, recipe.stage2.classifier, recipe.stage2.weight_decay_target)
        shifted_bn = recipe.stage2.shifted_bn

        def set_train_mode(m: nn.Module) -> None:
            set_stage2_mode(m, shifted_bn)
        delta_lr_factor = recipe.stage2.delta_lr_factor
    criterion = build_criterion(recipe.loss, recipe.model.num_experts, bundle.class_counts,
                                stage2=recipe.stage2 if recipe.stage == 2 else None)
    model, criterion = model.to(device), criterion.to(device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(recipe.optim, model.param_groups(recipe.optim.lr, recipe.optim.weight_decay,
                                                                 delta_lr_factor))
    scheduler = build_scheduler(recipe.optim, optimizer)
    meta = {"class_counts": bundle.class_counts.tolist(), "num_classes": bundle.num_classes,
            "in_chans": bundle.in_chans, "mean": list(bundle.mean), "std": list(bundle.std),
            "class_names": bundle.class_names, "input_size": input_size(bundle, recipe.data),
            "image_files": not bundle.in_memory,
            **({"pipeline": bundle.pipeline.as_dict(), "test_resize": bundle.pipeline.test_resize}
               if bundle.pipeline is not None else {})}
    amp = amp_dtype(device, tc.amp, warn=rank == 0)
    ensemble_taus, lam_model = ensemble_prior(recipe)

    def evaluate(m: nn.Module, analysis: bool = False) -> dict:
        return evaluate_model(m, bundle, recipe.data, device, batch_size=tc.eval_batch_size, amp=tc.amp,
                              taus=ensemble_taus, lam_model=lam_model, analysis=analysis)

    validate = None
    if tc.val_every:
        if bundle.holdout is None:
            raise BalpoeError("recipe key 'train.val_every' needs a validation split: set data.val_root (image_folder), "
                              "data.val_list (list datasets) or data.holdout_fraction (a slice of the training split)")

        def validate(m: nn.Module) -> dict:
            return validation_metrics(m, bundle, recipe.data, device, batch_size=tc.eval_batch_size, amp=tc.amp)

    return Plan(model=model, criterion=criterion, optimizer=optimizer, scheduler=scheduler, loader=loader,
                device=device, recipe=recipe, num_classes=bundle.num_classes, set_train_mode=set_train_mode,
                checkpoint_meta=meta, amp=amp, scaler=torch.amp.GradScaler(device.type, enabled=amp == torch.float16),
                compile=compile_enabled(tc.compile, device), evaluate=evaluate, validate=validate)


def write_results(report: dict, out: Path, recipe: Recipe, *, html_report: bool = True,
                  tensorboard: TensorBoardLogger | None = None) -> None:
    """The results of a finished run (rank 0): with ``train.eval_every`` the test curve
    (:func:`~balpoe.training.trainer.add_test_curve`: its last point into metrics.jsonl / metrics.csv,
    its summary into ``report``); ``OUT/eval.json``; the printed report; ``OUT/report.html``
    (``html_report``); TensorBoard's final scalars."""
    if recipe.train.eval_every:
        add_test_curve(report, out / "metrics.jsonl", recipe.optim.epochs, recipe.train.eval_every)
    write_json(report, out / "eval.json")
    print_report(report, title=f"{recipe.name}: balanced test set")
    if html_report:
        write_run_report(out)
    if tensorboard is not None:
        tensorboard.close(out, report)
    console.print(f"saved {out / 'last.pt'}, {out / 'eval.json'}, {out / 'metrics.jsonl'}")


def compile_enabled(setting: bool | str, device: torch.device) -> bool:
    """``train.compile`` on ``device``: ``True``/``False`` as written; ``"auto"`` compiles on CUDA
    only, where the multi-expert ResNet step is launch-bound and compiled CUDA graphs
    (``train.compile_mode: reduce-overhead``) pay, and not on a CPU, where the step is bound by
    convolution arithmetic and compiling does not repay its time (README "Performance")."""
    if setting == "auto":
        return device.type == "cuda"
    return setting is True


#: recipe keys that may differ when resuming: the learning-rate schedule (rebuilt for the new horizon
#: and fast-forwarded to the restored epoch) and bookkeeping that does not change what is learnt
RESUMABLE_KEYS = ("name", "optim.lr", "optim.epochs", "optim.warmup_epochs", "optim.schedule", "optim.milestones",
                  "optim.gamma", "optim.min_lr", "train.device", "train.threads", "train.checkpoint_every",
                  "train.eval_every", "train.eval_batch_size", "train.val_every", "train.early_stop_patience",
                  "train.compile", "train.compile_mode", "data.root",
                  "data.download", "data.num_workers", "data.decode", "data.train_root", "data.val_root",
                  "data.test_root", "data.train_list", "data.val_list", "data.test_list", "data.class_names",
                  "data.test_lists", "stage2.init_checkpoint")


#: files of a finished (or evaluated) run: never replaced by a new run, with or without resuming
RESULT_FILES = ("best.pt", "eval.json", "eval_best.json", "shift_eval.json")
#: files a run writes before its first checkpoint
UNFINISHED_FILES = ("recipe.yaml", "metrics.jsonl", "metrics.csv", "report.html")


def check_output_dir(out: Path, resume: bool | str) -> Path | None:
    """What ``out`` holds, read only (nothing is created): the checkpoint to resume from, or None
    for a new run.  ``resume``: True (``OUT/last.pt`` must exist), ``"auto"`` (resume if it exists,
    else start) or False.  Refused, with one line: ``out`` is a file; a run's file in it is a link or
    not a regular file; a run (``last.pt``) without resuming; results (``eval.json``, ``best.pt``, ...)
    without a ``last.pt`` to resume; the files of a run that stopped before its first checkpoint
    (``recipe.yaml``, ``metrics.jsonl``) unless ``resume`` is ``"auto"`` (which starts it again)."""
    try:
        if out.exists() and not out.is_dir():
            raise BalpoeError(f"output directory '{out}' is a file, not a directory")
        present = [name for name in RUN_FILES if os.path.lexists(out / name)]
    except OSError as e:
        raise BalpoeError(f"output directory '{short_path(out)}' cannot be read ({e.strerror or type(e).__name__})") from None
    for name in present:
        path = out / name
        if path.is_symlink():
            raise BalpoeError(f"'{path}' is a symbolic link; a run's files are never read or written through links: "
                              "remove it")
        if not path.is_file():
            raise BalpoeError(f"'{path}' is not a regular file; remove it or choose another output directory")
    last = out / "last.pt"
    if "last.pt" in present:
        if resume:
            return last
        raise RunExists(out)
    if resume is True:
        raise NoRunToResume(out)
    results = [n for n in RESULT_FILES if n in present]
    if results:
        raise BalpoeError(f"output directory '{out}' holds results ({', '.join(results)}) but no last.pt to resume; "
                          "they are never overwritten: choose another output directory")
    partial = [n for n in UNFINISHED_FILES if n in present]
    if partial and resume != "auto":
        raise UnfinishedRun(out, partial)
    return None


def _signature(path: Path | None) -> tuple | None:
    if path is None:
        return None
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _lock_output_dir(out: Path, resume: bool | str, resume_from: Path | None, expected: tuple | None,
                     device: torch.device) -> RunLock | None:
    """Create ``out`` and take its lock (:class:`~balpoe.runtime.files.RunLock`; under torchrun on
    rank 0 only, every rank learns whether it succeeded), then check, under the lock, that ``out``
    still holds what :func:`check_output_dir` found before the data were read (another run may have
    written it meanwhile); remove temporary files killed runs left there."""
    lock, error = None, None
    if dist.rank() == 0:
        try:
            ensure_writable_dir(out)
            lock = RunLock(out).acquire()
            now = check_output_dir(out, resume)
            if now != resume_from or _signature(now) != expected:
                raise BalpoeError(f"output directory '{out}' changed while this run was starting (another run wrote "
                                  "it); start again")
            remove_stale_temporaries(out)
        except BalpoeError as e:
            error = e
            if lock is not None:
                lock.release()
                lock = None
    flag = torch.tensor(0.0 if error is None else 1.0, device=device)
    if dist.is_distributed() and dist.all_reduce_sum(flag).item() > 0 and error is None:
        if lock is not None:
            lock.release()
        raise BalpoeError(f"rank 0 could not take the output directory '{out}'")
    if error is not None:
        raise error
    return lock


def check_inputs(recipe: Recipe) -> tuple[dict, Recipe] | None:
    """Every file the run reads besides the data, before anything is created: ``model.pretrained_file``
    (read and checked as a weights file) and, for stage 2, ``stage2.init_checkpoint`` (loaded,
    every field validated; returned with its recipe for :func:`build_plan`)."""
    if recipe.stage == 1 and recipe.model.pretrained_file:
        read_weights(recipe.model.pretrained_file)
    if recipe.stage == 2:
        return load_init_checkpoint(recipe.stage2.init_checkpoint)
    return None


#: image files whose absence is named in full in the error (the rest are counted)
_SHOWN_FILES = 1


def check_image_files(bundle: DataBundle) -> None:
    """Every image file of an image-file dataset (training, test and holdout splits) exists and is a
    readable regular file, so that a missing test image is found before training, not after it.
    Training images must have an image header PIL identifies, within the pixel limit
    (:func:`~balpoe.data.decode.open_image`: the header only; a damaged training image is found in
    the first epoch).  The test and holdout images, read only at evaluation, are decoded in full
    instead (:meth:`~balpoe.data.image_list.ImageListDataset.decode_every`, as many threads as torch
    uses), so that a foreign or oversized file and damaged pixel data behind a valid header are found
    before training too."""
    if bundle.in_memory:
        return
    for split in ("train", "test", "holdout"):
        data = getattr(bundle, split)
        if data is None:
            continue
        bad: list[tuple[str, str]] = []
        for path in data.paths:
            try:
                st = os.stat(path)
                problem = None if stat.S_ISREG(st.st_mode) else "not a regular file"
                if problem is None and not os.access(path, os.R_OK):
                    problem = "not readable"
            except FileNotFoundError:
                problem = "not found"
            except OSError as e:
                problem = e.strerror or type(e).__name__
            if problem:
                bad.append((str(path), problem))
            elif not bad and split == "train":
                open_image(path, path).close()   # one line naming the file when the header is not an image's
        if bad:
            first, why = bad[0]
            more = f" ({len(bad) - 1} more image file(s) of the {split} split too)" if len(bad) > 1 else ""
            raise BalpoeError(f"image file of the {split} split '{short_path(first)}': {why}{more}")
        if split != "train":
            data.decode_every(torch.get_num_threads(), f"{split} images")


def check_resume_data(bundle: DataBundle, ckpt: dict, path: Path) -> None:
    """The data a resumed run reads are those the checkpoint was trained on: same classes, class
    names, channels and training class counts (a moved data folder is fine; other data are not)."""
    checks = [("number of classes", bundle.num_classes, ckpt["num_classes"]),
              ("number of channels", bundle.in_chans, ckpt["in_chans"]),
              ("training class counts", [int(n) for n in bundle.class_counts.tolist()], ckpt["class_counts"])]
    if ckpt.get("class_names") is not None:
        checks.append(("class names", list(bundle.class_names), ckpt["class_names"]))
    for what, now, was in checks:
        if now != was:
            raise BalpoeError(f"the recipe's data differ from those '{path}' was trained on ({what}: "
                              f"{shown(now, 80)} here, {shown(was, 80)} there); a resumed run must read the same data")


def resume_changes(recipe: dict, ckpt: dict, path: Path) -> dict[str, tuple]:
    """The recipe keys that differ from the checkpoint's recipe (``key -> (was, now)``); a key
    outside :data:`RESUMABLE_KEYS` is a one-line error (the run would not be the one recorded),
    and so is an ``optim.epochs`` below the epoch already reached."""
    was, now = flat_keys(recipe_from_dict(ckpt["recipe"]).to_dict()), flat_keys(recipe)
    changes = {k: (was.get(k), now.get(k)) for k in now if was.get(k) != now.get(k)}
    for key, (a, b) in changes.items():
        if key not in RESUMABLE_KEYS:
            raise BalpoeError(f"recipe key '{key}' is {b!r} but '{path}' was trained with {a!r}; when resuming only "
                              "the learning-rate schedule (optim.lr, epochs, warmup_epochs, schedule, milestones, "
                              "gamma, min_lr) and bookkeeping keys may change")
    if now["optim.epochs"] < ckpt["epoch"]:
        raise BalpoeError(f"recipe key 'optim.epochs' is {now['optim.epochs']} but '{path}' already reached epoch "
                          f"{ckpt['epoch']}")
    return changes


def check_names(recipe: Recipe) -> None:
    """The recipe's registered names exist: ``data.dataset`` (:data:`balpoe.data.registry.DATASETS`),
    ``loss.name`` (:data:`balpoe.losses.build.LOSSES`; its keys and rules,
    :func:`~balpoe.losses.build.check_loss`) and ``model.backbone`` (timm's registry); a
    RandAugment config string parses."""
    get_dataset(recipe.data.dataset)
    if recipe.data.augment.policy == "randaugment":
        parse_randaugment(recipe.data.augment.randaugment)
    get_loss_entry(recipe.loss.name)
    check_loss(recipe)
    check_backbone(recipe.model.backbone)


def train(recipe: Recipe, out_dir: str | Path, resume: bool | str = False, show_progress: bool = True,
          report: bool = True) -> dict:
    """Train a (multi-expert) model as the recipe says into ``out_dir``; returns the final evaluation
    report.  ``resume``: True continues ``OUT/last.pt``; ``"auto"`` continues it if it exists and
    starts otherwise (one command line for job schedulers and elastic restarts).  On resuming, the
    learning-rate schedule is rebuilt from the recipe (so a longer ``optim.epochs`` extends the run
    with the schedule of the new horizon) and fast-forwarded to the restored epoch; other keys must
    not change (:func:`resume_changes`).  ``report``: write ``OUT/report.html`` at the end."""
    out = Path(out_dir)
    check_names(recipe)  # before anything is read or written
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    device = resolve_device(recipe.train.device)
    # Under torchrun: join the process group (gloo on CPU; NCCL with one GPU per process, cuda:LOCAL_RANK).
    rank, world_size, device = dist.init_distributed(device)
    threads_note = None
    if not recipe.train.threads and device.type == "cpu" and world_size == 1:
        threads, threads_note = auto_threads()  # no more threads than free cores: a busy machine does not collapse
        if threads_note:
            torch.set_num_threads(threads)
    # 1. every input, read only, before anything is created: the output directory's state, the
    #    checkpoint to resume, the weights files, the data (every rank checks, so all fail alike)
    resume_from = check_output_dir(out, resume)
    expected = _signature(resume_from)
    ckpt = None if resume_from is None else load_checkpoint(resume_from, map_location=device, resume=True)
    init = check_inputs(recipe)
    torch.manual_seed(recipe.seed)
    np.random.seed(recipe.seed)
    bundle = build_data(recipe.data, device, seed=recipe.seed)
    check_image_files(bundle)
    plan = build_plan(recipe, bundle, device, rank=rank, world_size=world_size, init=init)
    recipe = plan.recipe     # resolved: stage 2 with the stage-1 checkpoint's model and loss sections
    if ckpt is not None:
        changes = resume_changes(recipe.to_dict(), ckpt, resume_from)  # names a changed key first
        check_resume_data(bundle, ckpt, resume_from)
        plan.checkpoint_meta["resumed"] = list(ckpt.get("resumed", [])) + [
            {"epoch": ckpt["epoch"], "changed": {k: list(v) for k, v in changes.items()}}]
        if rank == 0 and changes:
            warnings.warn(f"resuming '{resume_from}' at epoch {ckpt['epoch']} with changed recipe keys: "
                          + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()), stacklevel=2)
    # printed by train_model once nothing can refuse the run any more (an error stays one line)
    pipeline = bundle.pipeline.describe(recipe.data.dataset, len(bundle.train)) if bundle.pipeline is not None else None
    hint = empty_group_hint(bundle.class_counts, recipe.data.many_threshold, recipe.data.few_threshold)
    plan.notes += [note for note in (threads_note, pipeline, hint) if note]
    # 2. the output directory: created and locked (one training run per folder) by rank 0
    lock = _lock_output_dir(out, resume, resume_from, expected, device)
    dist.barrier()
    result: dict = {}
    try:
        tensorboard = TensorBoardLogger(out, recipe.to_dict()) if recipe.train.log_tensorboard and rank == 0 else None
        if tensorboard is not None:
            plan.on_epoch.append(tensorboard.log_epoch)
        # 3. the epochs (every rank): metrics.jsonl, last.pt, with validation best.pt
        model = train_model(plan, out, resume=ckpt, show_progress=show_progress)
        if rank == 0:
            # 4. the final evaluation: the balanced test set, with what the run report draws
            result = plan.evaluate(model, analysis=True)
            # 5. the results: eval.json (with the test curve), the printed report, report.html
            write_results(result, out, recipe, html_report=report, tensorboard=tensorboard)
        dist.barrier()      # rank 0 evaluates while the others wait, then every rank leaves the group
    finally:
        if lock is not None:
            lock.release()
    dist.shutdown()
    return result
