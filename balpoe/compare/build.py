"""``balpoe compare``: train every recipe x seed, evaluate each run once, summarise (see the package
docstring).  Every input is checked before anything is trained or written."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Sequence

from balpoe.compare.page import write_outputs
from balpoe.compare.table import metric_columns, run_metrics, summarise
from balpoe.errors import BalpoeError
from balpoe.recipe import Recipe, flat_keys, load_recipe
from balpoe.runtime.checkpoint import load_checkpoint
from balpoe.runtime.console import console
from balpoe.runtime.files import ensure_writable_dir, parse_json, read_text
from balpoe.shift.build import ShiftOptions, evaluate_shift
from balpoe.shift.selector import get_adapt_mode
from balpoe.shift.targets import parse_test_dists
from balpoe.training.build import RESUMABLE_KEYS, train

#: recipe keys a finished run may differ in and still be reused (where the data are, how fast it ran)
BOOKKEEPING_KEYS = tuple(k for k in RESUMABLE_KEYS if not k.startswith("optim.") and k != "stage2.init_checkpoint")

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
    """True when ``folder`` holds a finished run (``last.pt`` and ``eval.json``) of ``recipe``; a
    finished run of another recipe (a key other than :data:`BOOKKEEPING_KEYS` differs) is a one-line
    error, never silently reused."""
    last = folder / "last.pt"
    if not (last.is_file() and (folder / "eval.json").is_file()):
        return False
    ckpt = load_checkpoint(last)
    was, now = flat_keys(ckpt["recipe"]), flat_keys(recipe.to_dict())
    skip = ("model.", "loss.") if recipe.stage == 2 else ()  # stage 2 takes them from its stage-1 checkpoint
    for key, value in now.items():
        if key in BOOKKEEPING_KEYS or key.startswith(skip) or key == "stage2.init_checkpoint":
            continue
        if key in was and was[key] != value:
            raise BalpoeError(f"compare: '{folder}' holds a finished run with recipe key '{key}' {was[key]!r}, "
                              f"not {value!r}; write the comparison elsewhere, or remove that folder to train it again")
    if ckpt["epoch"] < recipe.optim.epochs:
        return False  # a longer schedule: continued from its last checkpoint
    return True


def evaluate_run(folder: Path, seed: int, options: CompareOptions, mode: str) -> dict:
    """The run's ``shift/<mode>/shift_eval.json`` (reused when it holds the requested
    distributions and is newer than the checkpoint); the test logits come from the run's cache."""
    out = folder / "shift" / mode
    done = out / "shift_eval.json"
    wanted = parse_test_dists(options.test_dists)
    if done.is_file() and done.stat().st_mtime >= (folder / "last.pt").stat().st_mtime:
        rep = _read_json(done, "label-shift results")
        if set(wanted) <= set(rep.get("distributions", {})) and rep.get("seed") == seed:
            return rep
    opts = ShiftOptions(test_dists=options.test_dists, adapt=mode, seed=seed)
    return evaluate_shift(folder / "last.pt", opts, device=options.device, out=out, plots=False, quiet=True,
                          html_report=False, logits_cache=folder / LOGITS_CACHE)


def evaluate_modes(folder: Path, seed: int, options: CompareOptions, *, experts: int) -> dict[str, dict]:
    """The run's label-shift results of every mode that applies to it.  A mode that weighs experts
    does not apply to a one-expert run, and a mode that runs the model on the images
    (``needs_images``) is skipped with a one-line warning where the run's data cannot give them
    (image files): their cells stay empty."""
    shift = {}
    for mode in options.adapt:
        spec = get_adapt_mode(mode)
        if experts < spec.min_experts:
            continue
        try:
            shift[mode] = evaluate_run(folder, seed, options, mode)
        except BalpoeError as e:
            if not spec.needs_images:
                raise
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
    ensure_writable_dir(out, "comparison output directory")
    columns = list(metric_columns(list(options.adapt)))
    runs: dict[str, dict[int, dict]] = {m.name: {} for m in methods}
    details: dict[str, dict[int, dict]] = {m.name: {} for m in methods}
    total, done = len(methods) * len(options.seeds), 0
    result: dict = {}
    for m in methods:
        for seed in options.seeds:
            done += 1
            folder = run_folder(out, m.name, seed)
            recipe = m.recipes[seed]
            finished = check_finished_run(recipe, folder)
            console.rule(f"[{done}/{total}] {m.name}, seed {seed}: " + ("finished, reused" if finished else
                                                                        f"training into {folder}"))
            if not finished:
                train(recipe, folder, resume="auto", show_progress=show_progress, report=True)
            evaluation = _read_json(folder / "eval.json", "run results")
            shift = evaluate_modes(folder, seed, options, experts=len(evaluation.get("expert_acc", [])) or 1)
            row = run_metrics(evaluation, shift)
            runs[m.name][seed] = {c: row.get(c) for c in columns}   # a mode that did not apply: None
            details[m.name][seed] = {"run": str(folder), "eval": evaluation, "shift": shift}
            result = {
                "recipes": [{"name": x.name, "file": x.file, "stage1": x.stage1} for x in methods],
                "seeds": list(options.seeds), "overrides": list(options.overrides),
                "test_dists": options.test_dists, "adapt": list(options.adapt), "baseline": options.baseline,
                "columns": columns, "complete": done == total,
                "runs": {name: {str(s): {"run": details[name][s]["run"], "metrics": r} for s, r in seeds.items()}
                         for name, seeds in runs.items()},
                **summarise(runs, columns, options.baseline),
            }
            write_outputs(result, details, out, final=done == total)
    return result
