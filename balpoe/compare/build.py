"""``balpoe compare``: train every recipe x seed, evaluate each run once, summarise (see the package
docstring).  Every input is checked before anything is trained or written."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Sequence

from balpoe.compare.page import OUTPUTS, write_outputs
from balpoe.compare.table import metric_columns, run_metrics, summarise
from balpoe.errors import BalpoeError, NotApplicable
from balpoe.evaluate.build import ensemble_prior
from balpoe.evaluate.logits import file_digest
from balpoe.recipe import Recipe, flat_keys, load_recipe, recipe_from_dict
from balpoe.runtime.checkpoint import load_checkpoint, write_json
from balpoe.runtime.device import resolve_device
from balpoe.runtime.console import console
from balpoe.runtime.files import RunLock, check_output_path, ensure_writable_dir, parse_json, read_text
from balpoe.shift.build import ShiftOptions, evaluate_shift
from balpoe.shift.selector import get_adapt_mode
from balpoe.shift.targets import parse_test_dists
from balpoe.training.build import train
from balpoe.training.trainer import Diverged

#: recipe keys a finished run may differ in and still be reused: where the data are, how fast it ran
BOOKKEEPING_KEYS = ("data.root", "data.download", "data.num_workers", "train.device", "train.threads",
                    "train.checkpoint_every", "train.eval_batch_size", "train.compile", "train.compile_mode")
#: of those, what the evaluation of a reused run takes from ``--set`` (the data may have moved)
LOCATION_KEYS = ("data.root", "data.download", "data.num_workers")

LOGITS_CACHE = "test_logits.safetensors"


@dataclasses.dataclass(frozen=True)
class CompareOptions:
    """What ``balpoe compare`` runs: ``seeds`` (each recipe's ``seed`` key), ``overrides`` (``--set``
    on every recipe), ``test_dists`` (:func:`~balpoe.shift.targets.parse_test_dists`), ``adapt``
    (modes of :data:`~balpoe.shift.selector.ADAPT_MODES`, each evaluated on every distribution),
    ``baseline`` (a recipe name: paired differences against it), ``device``; checked when made."""
    seeds: Sequence[int] = (0,)
    overrides: Sequence[str] = ()
    test_dists: str = "all"
    adapt: Sequence[str] = ("none",)
    baseline: str | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        seeds, modes = list(self.seeds), list(self.adapt)
        if not seeds:
            raise BalpoeError("compare: give at least one seed")
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2 ** 32:
                raise BalpoeError(f"compare: seeds must be integers in [0, 2**32), got {s!r}")
        for label, values in (("seed", seeds), ("adaptation mode", modes)):
            repeated = sorted({str(v) for v in values if values.count(v) > 1})
            if repeated:
                raise BalpoeError(f"compare: {label} {', '.join(repeated)} given twice")
        if not modes:
            raise BalpoeError("compare: give at least one adaptation mode (none: no adaptation)")
        for m in modes:
            get_adapt_mode(m)
        parse_test_dists(self.test_dists)


@dataclasses.dataclass
class Method:
    """One recipe file of the comparison: its name (the recipe's ``name``) and its recipe per seed."""
    name: str
    file: str
    recipes: dict[int, Recipe]
    stage1: str | None = None   # the method whose same-seed run a stage-2 recipe starts from


def run_folder(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / name / f"seed{seed}"


def plan_methods(files: Sequence[str], options: CompareOptions, out: Path) -> list[Method]:
    """Every recipe x seed, loaded and checked; names are unique.  A stage-2 recipe whose
    ``stage2.init_checkpoint`` lies in a folder named like another recipe of the comparison
    (``runs/<name>/last.pt``, where ``balpoe train`` puts it) starts from that recipe's run of the
    same seed, which is trained first; otherwise from the checkpoint as written."""
    if not files:
        raise BalpoeError("compare: give at least one recipe")
    methods: list[Method] = []
    for f in files:
        recipes = {s: load_recipe(f, [*options.overrides, f"seed={s}"]) for s in options.seeds}
        name = recipes[options.seeds[0]].name
        for m in methods:
            if m.name == name:
                raise BalpoeError(f"compare: recipes '{m.file}' and '{f}' are both named {name!r}; give one "
                                  "of them another 'name'")
        methods.append(Method(name, str(f), recipes))
    names = [m.name for m in methods]
    if options.baseline is not None and options.baseline not in names:
        raise BalpoeError(f"compare: the baseline {options.baseline!r} is not a recipe of the comparison (names: "
                          f"{', '.join(names)})")
    for m in methods:
        first = m.recipes[options.seeds[0]]
        if first.stage == 2 and first.stage2.init_checkpoint:
            parent = Path(first.stage2.init_checkpoint).parent.name
            if parent in names and parent != m.name:
                m.stage1 = parent
                m.recipes = {s: load_recipe(m.file, [*options.overrides, f"seed={s}",
                                                     f"stage2.init_checkpoint={run_folder(out, parent, s) / 'last.pt'}"])
                             for s in options.seeds}
    order: list[Method] = [m for m in methods if m.stage1 is None]
    for m in methods:
        if m.stage1 is not None:
            if next(x for x in methods if x.name == m.stage1).stage1 is not None:
                raise BalpoeError(f"compare: recipe '{m.file}' starts from {m.stage1!r}, itself a stage-2 recipe")
            order.append(m)
    return order


def _read_json(path: Path, what: str) -> dict:
    return parse_json(read_text(path, what), str(path))


def check_finished_run(recipe: Recipe, folder: Path) -> bool:
    """True when ``folder`` holds a finished run (``last.pt`` at the last epoch, or stopped early,
    and ``eval.json``) of ``recipe``.  A finished run of another recipe (a key other than
    :data:`BOOKKEEPING_KEYS` differs, keys at their defaults included), or a stage-2 run older than
    the stage-1 checkpoint it starts from, is a one-line error, never silently reused."""
    last = folder / "last.pt"
    if not (last.is_file() and (folder / "eval.json").is_file()):
        return False
    ckpt = load_checkpoint(last)
    was, now = flat_keys(recipe_from_dict(ckpt["recipe"]).to_dict()), flat_keys(recipe.to_dict())
    skip = ("model.", "loss.") if recipe.stage == 2 else ()  # stage 2 takes them from its stage-1 checkpoint
    for key in sorted(set(was) | set(now)):
        if key in BOOKKEEPING_KEYS or key.startswith(skip) or key == "stage2.init_checkpoint":
            continue
        if was.get(key) != now.get(key):
            raise BalpoeError(f"compare: '{folder}' holds a finished run with recipe key '{key}' {was.get(key)!r}, "
                              f"not {now.get(key)!r}; write the comparison elsewhere, or remove that folder to train "
                              "it again")
    init = Path(recipe.stage2.init_checkpoint) if recipe.stage == 2 and recipe.stage2.init_checkpoint else None
    if init is not None and init.is_file() and init.stat().st_mtime > last.stat().st_mtime:
        raise BalpoeError(f"compare: the stage-1 checkpoint '{init}' is newer than the finished stage-2 run "
                          f"'{folder}' that starts from it; remove that folder to train it again")
    stopped = bool((ckpt.get("selection") or {}).get("stopped"))
    return stopped or ckpt["epoch"] >= recipe.optim.epochs  # else: a longer schedule, continued


def evaluate_run(folder: Path, seed: int, options: CompareOptions, mode: str, digest: str, lam_model: float) -> dict:
    """The run's ``shift/<mode>/shift_eval.json``, reused when ``compared.json`` beside it records
    this checkpoint (``digest``), these distributions and this seed, and it balanced the logits with
    this ``lam_model`` (:func:`~balpoe.evaluate.build.ensemble_prior`); the test logits come from the
    run's cache.  Returns it with the requested distributions only."""
    out = folder / "shift" / mode
    done, key_file = out / "shift_eval.json", out / "compared.json"
    wanted = parse_test_dists(options.test_dists)
    key = {"checkpoint_sha256": digest, "test_dists": wanted, "seed": seed}
    rep = None
    if done.is_file() and key_file.is_file() and _read_json(key_file, "comparison key") == key:
        rep = _read_json(done, "label-shift results")
    if rep is None or not set(wanted) <= set(rep.get("distributions", {})) or \
            rep.get("logit_prior_exponent") != lam_model:
        location = [o for o in options.overrides if o.split("=", 1)[0].strip() in LOCATION_KEYS]
        rep = evaluate_shift(folder / "last.pt", ShiftOptions(test_dists=options.test_dists, adapt=mode, seed=seed),
                             device=options.device, overrides=location, out=out, plots=False, quiet=True,
                             html_report=False, logits_cache=folder / LOGITS_CACHE)
        write_json(key, key_file)
    return {**rep, "distributions": {d: rep["distributions"][d] for d in wanted}}


def evaluate_modes(folder: Path, seed: int, options: CompareOptions, *, experts: int) -> dict[str, dict]:
    """The run's label-shift results of every mode that applies to it.  A mode that weighs experts
    does not apply to a one-expert run, and one that does not apply to the run's data
    (:class:`~balpoe.errors.NotApplicable`, e.g. SADE's aggregation on image files) is skipped with a
    one-line warning: their cells stay empty."""
    shift = {}
    digest = file_digest(folder / "last.pt")
    lam_model = ensemble_prior(recipe_from_dict(load_checkpoint(folder / "last.pt")["recipe"]))[1]
    for mode in options.adapt:
        if experts < get_adapt_mode(mode).min_experts:
            continue
        try:
            shift[mode] = evaluate_run(folder, seed, options, mode, digest, lam_model)
        except NotApplicable as e:
            warnings.warn(f"{folder}: adaptation mode {mode!r} skipped: {e}", stacklevel=2)
    return shift


def compare(files: Sequence[str], options: CompareOptions, out: str | Path, *, show_progress: bool = True) -> dict:
    """``balpoe compare RECIPE... --out OUT``: every recipe x seed trained into
    ``OUT/runs/<name>/seed<N>`` (finished runs reused, interrupted ones continued), evaluated on the
    balanced test set and on every test distribution with every adaptation mode, and summarised into
    ``OUT/compare.json``, ``compare.md`` and ``compare.html`` (rewritten after every run, so an
    interrupted comparison shows what it has).  Returns the ``compare.json`` dict."""
    out = Path(out)
    methods = plan_methods(files, options, out)  # every recipe checked before anything is written
    resolve_device(options.device, what="evaluation device")
    for name in OUTPUTS:
        check_output_path(out / name, "comparison output", inputs=files, create=False)
    ensure_writable_dir(out, "comparison output directory")
    lock = RunLock(out).acquire()  # one comparison per folder (each run folder has its own lock too)
    try:
        return _compare(methods, options, out, show_progress)
    finally:
        lock.release()


def _compare(methods: list[Method], options: CompareOptions, out: Path, show_progress: bool) -> dict:
    columns = list(metric_columns(list(options.adapt)))
    runs: dict[str, dict[int, dict]] = {m.name: {} for m in methods}
    details: dict[str, dict[int, dict]] = {m.name: {} for m in methods}
    failed: dict[str, dict[str, str]] = {}
    total, done = len(methods) * len(options.seeds), 0
    result: dict = {}
    for m in methods:
        for seed in options.seeds:
            done += 1
            folder = run_folder(out, m.name, seed)
            recipe = m.recipes[seed]
            # 1. train the run unless a finished run of this recipe is there (a diverged run, or a
            #    stage 2 whose stage 1 diverged, is recorded and the comparison goes on)
            upstream = failed.get(m.stage1, {}).get(str(seed)) if m.stage1 else None
            finished = upstream is None and check_finished_run(recipe, folder)
            console.rule(f"[{done}/{total}] {m.name}, seed {seed}: " + (
                "finished, reused" if finished else "not trained: its stage 1 failed" if upstream else
                f"training into {folder}"))
            error = f"stage 1 ({m.stage1}) failed: {upstream}" if upstream else None
            if not finished and error is None:
                try:
                    train(recipe, folder, resume="auto", show_progress=show_progress, report=True)
                except Diverged as e:
                    error = str(e)
            if error is not None:
                warnings.warn(f"{m.name}, seed {seed}: {error}", stacklevel=2)
                failed.setdefault(m.name, {})[str(seed)] = error
                runs[m.name][seed] = {c: None for c in columns}
            else:
                # 2. evaluate it: the balanced test set (eval.json), every mode on every distribution
                evaluation = _read_json(folder / "eval.json", "run results")
                shift = evaluate_modes(folder, seed, options, experts=len(evaluation.get("expert_acc", [])) or 1)
                row = run_metrics(evaluation, shift)
                runs[m.name][seed] = {c: row.get(c) for c in columns}   # a mode that did not apply: None
                details[m.name][seed] = {"run": str(folder), "eval": evaluation, "shift": shift}
            # 3. the summary so far: compare.json / .md / .html
            result = {
                "recipes": [{"name": x.name, "file": x.file, "stage1": x.stage1} for x in methods],
                "seeds": list(options.seeds), "overrides": list(options.overrides),
                "test_dists": options.test_dists, "adapt": list(options.adapt), "baseline": options.baseline,
                "columns": columns, "complete": done == total, "failed": failed,
                "runs": {name: {str(s): {"run": str(run_folder(out, name, s)), "metrics": r} for s, r in seeds.items()}
                         for name, seeds in runs.items()},
                **summarise(runs, columns, options.baseline),
            }
            write_outputs(result, details, out, final=done == total)
    return result
