"""``balpoe`` command line: ``balpoe train RECIPE``, ``balpoe eval CHECKPOINT``, ``balpoe report RUN_DIR``,
``balpoe predict CHECKPOINT IMAGE_OR_FOLDER ...``, ``balpoe export CHECKPOINT --format ...``.

The only module that names command-line flags.  User errors print one line (``error: ...``) and
exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path

from balpoe.errors import EXIT_USAGE, BalpoeError, NoRunToResume, RunExists, UnfinishedRun, short_path
from balpoe.evaluate.build import SOURCES, evaluate_checkpoint
from balpoe.evaluate.html_report import report_inputs, screenshot, write_html_report
from balpoe.recipe import load_recipe
from balpoe.runtime.console import console
from balpoe.runtime.files import check_output_path
from balpoe.serve.export import FORMATS, export
from balpoe.serve.predict import predict
from balpoe.shift.build import evaluate_shift
from balpoe.shift.selector import ADAPT_MODES, CALIBRATIONS, ESTIMATORS
from balpoe.training.build import train


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {text!r}") from None
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {value}")
    return value


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="balpoe", description="Long-tailed recognition with calibrated multi-expert ensembles "
                "(BalPoE, MiSLAS).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train from a recipe (stage 1, or stage 2 when the recipe says stage: 2)")
    t.add_argument("recipe", help="YAML recipe file")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                   help="override a recipe key, e.g. --set optim.lr=0.05 (repeatable)")
    t.add_argument("--out", help="output directory (default: runs/<recipe name>)")
    t.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"],
                   help="continue from OUT/last.pt; '--resume auto': continue if OUT/last.pt exists, else start "
                   "(one command line for job schedulers and torchrun restarts)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--no-report", action="store_true", help="do not write OUT/report.html at the end")

    e = sub.add_parser("eval", help="evaluate a checkpoint on the balanced test set")
    e.add_argument("checkpoint")
    e.add_argument("--device", default="auto")
    e.add_argument("--batch-size", type=_positive_int, default=None)
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                   help="override a key of the checkpoint's recipe, e.g. --set data.root=/data")
    e.add_argument("--out", help="JSON output path (default: eval.json next to the checkpoint); with the "
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
    s.add_argument("--calibration", default="bcts", choices=CALIBRATIONS,
                   help="calibrator of --adapt unlabelled (default bcts)")
    s.add_argument("--estimator", default="1d", choices=list(ESTIMATORS),
                   help="prior estimator of --adapt unlabelled: 1d (default: MLE of the exponent of pi_train^lambda) "
                   "| em (smoothed EM shrunk toward it) | auto (em when N/K >= 20)")
    s.add_argument("--source", default="auto", choices=SOURCES,
                   help="labelled source data for calibration: auto (default: the recipe's held-out slice, else a "
                   "slice of the seen training split, with a warning) | holdout | train")
    s.add_argument("--labels-per-class", type=_positive_number, default=5, metavar="K",
                   help="--adapt labelled: K*C labelled images drawn at random from each target set, i.e. K per "
                   "class on average (default 5)")
    s.add_argument("--seed", type=_seed, default=0, help="seed of user-prior subsets and labelled draws")
    s.add_argument("--no-plots", action="store_true", help="no reliability diagrams")
    e.add_argument("--no-report", action="store_true",
                   help="do not rewrite report.html in the checkpoint's run directory")

    r = sub.add_parser("report", help="write RUN_DIR/report.html: training curves, per-class and per-expert "
                       "accuracy, calibration, label shift, recipe (one self-contained file)")
    r.add_argument("run_dir")
    r.add_argument("--out", help="output file (default: RUN_DIR/report.html)")
    r.add_argument("--png", metavar="FILE", help="also save a screenshot of the page (needs headless Chromium)")
    _serve_parsers(sub)
    return p


def _serve_parsers(sub) -> None:
    """``balpoe predict`` and ``balpoe export``."""
    prior_help = ("target label distribution the logits are adjusted to (+ log q): 'uniform' (default: the balanced "
                  "logits), comma-separated class weights, dirichlet:<profile>:<concentration>:<seed>, or a file of "
                  "class weights (text: one per class in label order; JSON: a list, or class name -> weight)")
    r = sub.add_parser("predict", help="top-k classes of image files (JPEG/PNG, any size) with a trained model")
    r.add_argument("checkpoint", help="checkpoint (.pt) or weights file (.safetensors)")
    r.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="image files and/or folders (every image inside, recursively, sorted)")
    r.add_argument("--prior", metavar="SPEC", help=prior_help)
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

    x = sub.add_parser("export", help="export a checkpoint: its weights (safetensors), or one inference module "
                       "(TorchScript, ONNX) mapping float images [B, C, H, W] in [0, 1] to balanced logits")
    x.add_argument("checkpoint", help="checkpoint (.pt) or weights file (.safetensors)")
    x.add_argument("--format", required=True, choices=list(FORMATS),
                   help="safetensors: the weights + recipe metadata; torchscript / onnx: one module with the "
                   "normalisation inside, input float [B, C, H, W] in [0, 1] (RGB, or grey for 1-channel models), "
                   "output the ensemble's balanced logits [B, K]; preprocessing, class names, prior and recipe in "
                   "the file's metadata (onnx needs: pip install \"balpoe[export]\")")
    x.add_argument("--prior", metavar="SPEC", help="torchscript / onnx: " + prior_help)
    x.add_argument("--out", help="output file (default: next to the checkpoint with the format's suffix: "
                   + ", ".join(FORMATS.values()) + ")")


def _train(args) -> None:
    recipe = load_recipe(args.recipe, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / recipe.name
    train(recipe, out, resume=args.resume, show_progress=not args.no_progress, report=not args.no_report)


def _eval(args) -> None:
    if args.test_dists is None and args.prior is None and args.test_list is None and args.adapt is None:
        evaluate_checkpoint(args.checkpoint, device=args.device, batch_size=args.batch_size,
                            overrides=args.overrides, out=args.out, report=not args.no_report)
        return
    evaluate_shift(args.checkpoint, device=args.device, batch_size=args.batch_size, overrides=args.overrides,
                   out=args.out, test_dists=args.test_dists, priors=args.prior, test_lists=args.test_list,
                   adapt=args.adapt or "none",
                   calibration=args.calibration, estimator=args.estimator, source=args.source,
                   labels_per_class=args.labels_per_class, seed=args.seed, plots=not args.no_plots,
                   html_report=not args.no_report)


def _report_cmd(args) -> None:
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
    with warnings.catch_warnings():
        # one line per warning (an unreadable image, uncalibrated adaptation), every one shown
        warnings.showwarning = _one_line_warning
        warnings.filterwarnings("always", category=UserWarning, module="balpoe")
        predict(args.checkpoint, args.inputs, prior=args.prior, adapt=args.adapt, topk=args.topk, device=args.device,
                batch_size=args.batch_size, out=args.out, estimator=args.estimator, calibration=args.calibration)


def _export(args) -> None:
    export(args.checkpoint, args.format, prior=args.prior, out=args.out)


COMMANDS = {"train": _train, "eval": _eval, "report": _report_cmd, "predict": _predict, "export": _export}


def _report(message: str) -> None:
    """One ``error: ...`` line on stderr; under torchrun from rank 0 only (every rank exits non-zero)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except _UsageError as e:
        _report(str(e))
        return EXIT_USAGE
    warnings.filterwarnings("default", category=UserWarning, module="balpoe")
    try:
        COMMANDS[args.command](args)
    except UnfinishedRun as e:
        _report(f"output directory '{e.out}' holds a run that stopped before its first checkpoint "
                f"({', '.join(e.files)}); pass --resume auto to start it again or --out to choose another directory")
        return EXIT_USAGE
    except RunExists as e:
        _report(f"output directory '{e.out}' already holds a run; pass --resume to continue it or --out to choose "
                "another directory")
        return EXIT_USAGE
    except NoRunToResume as e:
        _report(f"--resume: {e} (--resume auto starts a new run when there is none)")
        return EXIT_USAGE
    except BalpoeError as e:
        _report(str(e))
        return EXIT_USAGE
    except OSError as e:  # a file-system failure the code did not name (no space left, a name too long, ...)
        where = f" '{short_path(e.filename)}'" if getattr(e, "filename", None) else ""
        _report(f"file system error{where}: {e.strerror or type(e).__name__}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _report("interrupted; the last checkpoint written is intact")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
