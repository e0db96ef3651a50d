"""``balpoe`` command line: ``balpoe train RECIPE``, ``balpoe eval CHECKPOINT``, ``balpoe report RUN_DIR``,
``balpoe predict CHECKPOINT IMAGE_OR_FOLDER ...``, ``balpoe compare RECIPE ...``, ``balpoe export CHECKPOINT
--format ...``.

The only module that names command-line flags.  User errors print one line (``error: ...``) and
exit with status 2; no traceback.

A command's arguments (and the registries their choices come from) are added to the parser only
when that command runs, and its implementation is imported after its arguments are parsed: the one
place in the package with function-local imports, so that ``balpoe --help`` answers without
loading torch.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path

from balpoe import __version__
from balpoe.errors import EXIT_USAGE, BalpoeError, NoRunToResume, OutputExists, RunExists, UnfinishedRun, short_path


class _UsageError(Exception):
    """A command-line usage error (bad flag or flag value)."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors become one line (``error: ...``, exit code 2) instead of usage + message."""

    def error(self, message: str):
        raise _UsageError(f"{self.prog}: {message}")


def _key_value(text: str) -> str:
    if "=" not in text or not text.split("=", 1)[0].strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return text


def _checked(convert, ok, expected: str):
    """An argparse ``type``: ``convert(text)`` that ``ok`` accepts, else ``expected ..., got ...``."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_seed = _checked(int, lambda v: 0 <= v < 2 ** 32, "an integer in [0, 2**32)")
_positive_number = _checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def _train_arguments(t: argparse.ArgumentParser) -> None:
    t.add_argument("recipe", help="YAML recipe file")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                   help="override a recipe key, e.g. --set optim.lr=0.05 (repeatable)")
    t.add_argument("--out", help="output directory (default: runs/<recipe name>)")
    t.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"],
                   help="continue from OUT/last.pt; '--resume auto': continue if OUT/last.pt exists, else start "
                   "(one command line for job schedulers and torchrun restarts)")
    t.add_argument("--no-progress", action="store_true",
                   help="one plain line per epoch instead of the progress bar (the default when stdout is not a "
                   "terminal)")
    t.add_argument("--print-recipe", action="store_true",
                   help="print the resolved recipe (the file with --set applied and every default filled in) and exit")
    t.add_argument("--no-report", action="store_true", help="do not write OUT/report.html at the end")


def _eval_arguments(e: argparse.ArgumentParser) -> None:
    from balpoe.evaluate.build import SOURCES
    from balpoe.shift.build import ShiftOptions
    from balpoe.shift.selector import ADAPT_MODES, CALIBRATIONS, ESTIMATORS
    default = ShiftOptions()
    e.add_argument("checkpoint", help="checkpoint to evaluate: a run's last.pt, its best.pt (the best epoch on the "
                   "validation split, with train.val_every), or a .safetensors weights file")
    e.add_argument("--device", default="auto", help="auto (default: CUDA when available), cpu, cuda, cuda:N")
    e.add_argument("--batch-size", type=_positive_int, default=None,
                   help="images per forward pass (default: the recipe's train.eval_batch_size)")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                   help="override a key of the checkpoint's recipe, e.g. --set data.root=/data")
    e.add_argument("--out", help="JSON output path (default: eval.json next to the checkpoint, eval_best.json for "
                   "best.pt); with the "
                   "test-shift options below: the output directory (default: the checkpoint's)")
    s = e.add_argument_group("test label shift (any of these switches to shift_eval.json/.md + reliability PNGs)")
    s.add_argument("--test-dists", metavar="DISTS",
                   help="'all' (forward50..uniform..backward50) or names, e.g. forward50,uniform,backward5; "
                   "the test logits are computed once and every distribution is indexed from them")
    s.add_argument("--prior", action="append", metavar="SPEC",
                   help="a target prior: comma-separated class weights, or dirichlet:<profile>:<concentration>:"
                   "<seed> (e.g. dirichlet:forward10:100:0); repeatable")
    s.add_argument("--test-list", action="append", metavar="FILE",
                   help="a test-distribution list file ('path label' lines, a subset of the test split, e.g. a "
                   "published ImageNet-LT / iNaturalist forward or backward test list), named by its file stem; "
                   "repeatable (adds to the recipe's data.test_lists)")
    s.add_argument("--adapt", metavar="MODE", choices=list(ADAPT_MODES),
                   help="test-time tau selector: " + "; ".join(f"{k}: {m.help}" for k, m in ADAPT_MODES.items()))
    s.add_argument("--calibration", default=default.calibration, choices=CALIBRATIONS,
                   help=f"calibrator of --adapt unlabelled (default {default.calibration})")
    s.add_argument("--estimator", default=default.estimator, choices=list(ESTIMATORS),
                   help="prior estimator of --adapt unlabelled: 1d (default: MLE of the exponent of pi_train^lambda) "
                   f"| em (smoothed EM shrunk toward it) | auto (em when N/K >= {ESTIMATORS['auto'].em_from:g})")
    s.add_argument("--source", default=default.source, choices=SOURCES,
                   help="labelled source data for calibration: auto (default: the recipe's held-out slice, else a "
                   "slice of the seen training split, with a warning) | holdout | train")
    s.add_argument("--labels-per-class", type=_positive_number, default=default.labels_per_class, metavar="K",
                   help="--adapt labelled: K*C labelled images drawn at random from each target set, i.e. K per "
                   f"class on average (default {default.labels_per_class:g})")
    s.add_argument("--sade-epochs", type=_positive_int, default=default.sade_epochs, metavar="N",
                   help=f"--adapt sade: epochs over each target set (default {default.sade_epochs}, as SADE)")
    s.add_argument("--sade-batch-size", type=_positive_int, default=default.sade_batch_size, metavar="B",
                   help=f"--adapt sade: images per step (default {default.sade_batch_size}, as SADE)")
    s.add_argument("--sade-lr", type=_positive_number, default=None, metavar="LR",
                   help="--adapt sade: SGD learning rate (default: SADE's official one for the dataset, else "
                   "CIFAR-100-LT's 0.1)")
    s.add_argument("--seed", type=_seed, default=default.seed,
                   help="seed of user-prior subsets, labelled draws and --adapt sade's views")
    s.add_argument("--no-plots", action="store_true", help="no reliability diagrams")
    e.add_argument("--no-report", action="store_true",
                   help="do not rewrite report.html in the checkpoint's run directory")


def _report_arguments(r: argparse.ArgumentParser) -> None:
    r.add_argument("run_dir")
    r.add_argument("--out", help="output file (default: RUN_DIR/report.html)")
    r.add_argument("--png", metavar="FILE", help="also save a screenshot of the page (needs headless Chromium)")


PRIOR_HELP = ("target label distribution the logits are adjusted to (+ log q): 'uniform' (default: the balanced "
              "logits), comma-separated class weights, dirichlet:<profile>:<concentration>:<seed>, or a file of "
              "class weights (text: one per class in label order; JSON: a list, or class name -> weight)")


def _predict_arguments(r: argparse.ArgumentParser) -> None:
    from balpoe.shift.selector import CALIBRATIONS, ESTIMATORS
    r.add_argument("checkpoint", help="checkpoint (.pt) or weights file (.safetensors)")
    r.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="image files and/or folders (every image inside, recursively, sorted)")
    r.add_argument("--prior", metavar="SPEC", help=PRIOR_HELP)
    r.add_argument("--adapt", choices=["unlabelled"],
                   help="'unlabelled': estimate the label distribution of all the given images with the test-time "
                   "tau selector first (calibrated on the checkpoint's labelled source data when its data set is "
                   "found on this machine), report it and predict with the adapted logits")
    r.add_argument("--calibration", default="bcts", choices=CALIBRATIONS,
                   help="calibrator of --adapt unlabelled (default bcts)")
    r.add_argument("--estimator", default="1d", choices=list(ESTIMATORS),
                   help="prior estimator of --adapt unlabelled, as in balpoe eval (default 1d)")
    r.add_argument("--topk", type=_positive_int, default=5, help="classes per image (default 5)")
    r.add_argument("--out", default="predictions.jsonl",
                   help="JSON-lines output, one row per image: path, labels, probabilities, class_ids (or error) "
                   "(default: predictions.jsonl in the current directory)")
    r.add_argument("--device", default="auto", help="auto (default: CUDA when available), cpu, cuda, cuda:N")
    r.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward pass (default 64)")
    r.add_argument("--force", action="store_true", help="overwrite an existing --out file")


def _export_arguments(x: argparse.ArgumentParser) -> None:
    from balpoe.serve.export import FORMATS
    x.add_argument("checkpoint", help="checkpoint (.pt) or weights file (.safetensors)")
    x.add_argument("--format", required=True, choices=list(FORMATS),
                   help="safetensors: the weights + recipe metadata; torchscript / pt2 (torch.export) / onnx: one "
                   "module with the "
                   "normalisation inside, input float [B, C, H, W] in [0, 1] (RGB, or grey for 1-channel models), "
                   "output the ensemble's balanced logits [B, K]; preprocessing, class names, prior and recipe in "
                   "the file's metadata (onnx needs: pip install \"balpoe[export]\")")
    x.add_argument("--prior", metavar="SPEC", help="torchscript / pt2 / onnx: " + PRIOR_HELP)
    x.add_argument("--out", help="output file (default: next to the checkpoint with the format's suffix: "
                   + ", ".join(FORMATS.values()) + ")")
    x.add_argument("--force", action="store_true", help="overwrite an existing output file")


def _compare_arguments(c: argparse.ArgumentParser) -> None:
    from balpoe.shift.selector import ADAPT_MODES
    c.add_argument("recipes", nargs="+", metavar="RECIPE", help="YAML recipe files, one per method (named by their "
                   "'name' key)")
    c.add_argument("--seeds", nargs="+", type=_seed, default=[0], metavar="SEED",
                   help="train every recipe once per seed (its 'seed' key; default 0); runs of the same seed are "
                   "paired")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                   help="override a key of every recipe, e.g. --set optim.epochs=2 (repeatable)")
    c.add_argument("--test-dists", default="all", metavar="DISTS",
                   help="test label distributions: 'all' (default: forward50..uniform..backward50) or names")
    c.add_argument("--adapt", nargs="+", default=["none"], metavar="MODE", choices=list(ADAPT_MODES),
                   help="adaptation modes, each evaluated on every distribution (default: none): "
                   + ", ".join(ADAPT_MODES))
    c.add_argument("--baseline", metavar="NAME", help="a recipe name: paired differences (same seed) against it")
    c.add_argument("--out", default="runs/compare",
                   help="output directory (default runs/compare): runs/<name>/seed<N>/ and compare.json / .md / "
                   ".html; the same command again continues an interrupted comparison")
    c.add_argument("--device", default="auto", help="evaluation device: auto (default), cpu, cuda, cuda:N (training "
                   "uses each recipe's train.device)")
    c.add_argument("--no-progress", action="store_true", help="one plain line per epoch instead of progress bars")


#: command -> (help, the function adding its arguments)
SUBCOMMANDS = {
    "train": ("train from a recipe (stage 1, or stage 2 when the recipe says stage: 2)", _train_arguments),
    "eval": ("evaluate a checkpoint on the balanced test set", _eval_arguments),
    "report": ("write RUN_DIR/report.html: training curves, per-class and per-expert accuracy, calibration, label "
               "shift, recipe (one self-contained file)", _report_arguments),
    "predict": ("top-k classes of image files (JPEG/PNG, any size) with a trained model", _predict_arguments),
    "compare": ("train and evaluate several recipes x seeds on one split and protocol: one table (mean ± std, "
                "paired differences against a baseline) and compare.json / .md / .html", _compare_arguments),
    "export": ("export a checkpoint: its weights (safetensors), or one inference module (TorchScript, torch.export "
               ".pt2, ONNX) mapping float images [B, C, H, W] in [0, 1] to balanced logits", _export_arguments),
}


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; the arguments of ``command`` only (the others are listed with their help)."""
    p = _Parser(prog="balpoe", description="Long-tailed recognition with calibrated multi-expert ensembles "
                "(BalPoE, MiSLAS).")
    p.add_argument("--version", action="version", version=f"balpoe {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (help_text, add_arguments) in SUBCOMMANDS.items():
        parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            add_arguments(parser)
    return p


def _train(args) -> None:
    from balpoe.recipe import load_recipe
    from balpoe.training.build import train
    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_recipe:
        sys.stdout.write(recipe.to_yaml())
        return
    out = Path(args.out) if args.out else Path("runs") / recipe.name
    train(recipe, out, resume=args.resume, show_progress=not args.no_progress, report=not args.no_report)


def _eval(args) -> None:
    from balpoe.evaluate.build import evaluate_checkpoint
    from balpoe.shift.build import ShiftOptions, evaluate_shift
    if args.test_dists is None and args.prior is None and args.test_list is None and args.adapt is None:
        evaluate_checkpoint(args.checkpoint, device=args.device, batch_size=args.batch_size,
                            overrides=args.overrides, out=args.out, report=not args.no_report)
        return
    options = ShiftOptions(test_dists=args.test_dists, priors=args.prior, test_lists=args.test_list,
                           adapt=args.adapt or ShiftOptions.adapt, calibration=args.calibration,
                           estimator=args.estimator, source=args.source, labels_per_class=args.labels_per_class,
                           sade_epochs=args.sade_epochs, sade_batch_size=args.sade_batch_size, sade_lr=args.sade_lr,
                           seed=args.seed)
    evaluate_shift(args.checkpoint, options, device=args.device, batch_size=args.batch_size,
                   overrides=args.overrides, out=args.out, plots=not args.no_plots, html_report=not args.no_report)


def _report(args) -> None:
    from balpoe.evaluate.run_report import report_inputs, screenshot, write_html_report
    from balpoe.runtime.console import console
    from balpoe.runtime.files import check_output_path
    if args.png:  # checked before the page is written
        html = Path(args.out) if args.out else Path(args.run_dir) / "report.html"
        check_output_path(args.png, "screenshot", inputs=[*report_inputs(args.run_dir), html], create=False)
    path = write_html_report(args.run_dir, args.out)
    console.print(f"saved {path}")
    if args.png:
        console.print(f"saved {screenshot(path, args.png)}")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _predict(args) -> None:
    from balpoe.serve.predict import predict
    with warnings.catch_warnings():
        # one line per warning (an unreadable image, uncalibrated adaptation), every one shown
        warnings.showwarning = _one_line_warning
        warnings.filterwarnings("always", category=UserWarning, module="balpoe")
        predict(args.checkpoint, args.inputs, prior=args.prior, adapt=args.adapt, topk=args.topk, device=args.device,
                batch_size=args.batch_size, out=args.out, estimator=args.estimator, calibration=args.calibration,
                overwrite=args.force)


def _export(args) -> None:
    from balpoe.serve.export import export
    export(args.checkpoint, args.format, prior=args.prior, out=args.out, overwrite=args.force)


def _compare(args) -> None:
    from balpoe.compare.build import CompareOptions, compare
    options = CompareOptions(seeds=args.seeds, overrides=args.overrides, test_dists=args.test_dists,
                             adapt=args.adapt, baseline=args.baseline, device=args.device)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning   # one line each, and a message repeated run after run once
        warnings.filterwarnings("once", category=UserWarning, module="balpoe")
        compare(args.recipes, options, args.out, show_progress=not args.no_progress)


COMMANDS = {"compare": _compare, "train": _train, "eval": _eval, "report": _report, "predict": _predict, "export": _export}


def _print_error(message: str) -> None:
    """One ``error: ...`` line on stderr; under torchrun from rank 0 only (every rank exits non-zero)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        args = _parser(command if command in SUBCOMMANDS else None).parse_args(argv)
    except _UsageError as e:
        _print_error(str(e))
        return EXIT_USAGE
    warnings.filterwarnings("default", category=UserWarning, module="balpoe")
    try:
        COMMANDS[args.command](args)
    except OutputExists as e:
        _print_error(f"{e.what} '{e.path}' already exists; pass --force to overwrite it, or --out to write elsewhere")
        return EXIT_USAGE
    except UnfinishedRun as e:
        _print_error(f"output directory '{e.out}' holds a run that stopped before its first checkpoint "
                     f"({', '.join(e.files)}); pass --resume auto to start it again or --out to choose another "
                     "directory")
        return EXIT_USAGE
    except RunExists as e:
        _print_error(f"output directory '{e.out}' already holds a run; pass --resume to continue it or --out to "
                     "choose another directory")
        return EXIT_USAGE
    except NoRunToResume as e:
        _print_error(f"--resume: {e} (--resume auto starts a new run when there is none)")
        return EXIT_USAGE
    except BalpoeError as e:
        _print_error(str(e))
        return EXIT_USAGE
    except OSError as e:  # a file-system failure the code did not name (no space left, a name too long, ...)
        where = f" '{short_path(e.filename)}'" if getattr(e, "filename", None) else ""
        _print_error(f"file system error{where}: {e.strerror or type(e).__name__}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _print_error("interrupted; the last checkpoint written is intact")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
