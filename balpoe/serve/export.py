"""``balpoe export CKPT --format safetensors|torchscript|pt2|onnx``: a trained model as one file.

* ``safetensors``: the weights exactly, with the resolved recipe and the data description as JSON
  metadata (:func:`~balpoe.runtime.checkpoint.save_safetensors`); loads back with
  :func:`~balpoe.evaluate.build.load_model` and evaluates/predicts like the checkpoint.
* ``torchscript`` / ``pt2`` (``torch.export``) / ``onnx``: ONE module (:class:`~balpoe.serve.serving.ServingModule`)

      input   ``images``: float32 ``[B, C, H, W]``, values in [0, 1] (``ToTensor`` scale), channels
              RGB (or grey for a 1-channel model), already resized (and centre-cropped) to the
              model's input size -- the metadata says how;
      output  ``logits``: float32 ``[B, K]``, the ensemble's balanced logits
              ``f̄ - lambda_m log pi_train``, plus ``log q`` when exported with a target prior q;
              ``softmax`` gives the class probabilities.

  The normalisation (mean, std) is inside the module.  The file's metadata (TorchScript
  ``_extra_files``, ``torch.export.save``'s ``extra_files``, ONNX ``metadata_props``; :func:`read_metadata` reads both) holds, as JSON
  strings: ``format``, ``preprocess`` (input size, channel order, value range, mean, std, resize),
  ``class_names``, ``prior``, ``recipe``, ``input`` and ``output`` (one-line descriptions),
  ``checkpoint``.  The batch axis is dynamic.  Every export is checked: the written file is loaded
  back and run on a random batch against the PyTorch module (TorchScript and pt2 within 1e-5, ONNX in
  onnxruntime within 1e-4; safetensors bit-exact weights).

ONNX uses the ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``), which
needs ``onnxscript``; the check needs ``onnxruntime`` (``pip install "balpoe[export]"``).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from balpoe.errors import BalpoeError
from balpoe.evaluate.build import load_model
from balpoe.losses.build import expert_taus
from balpoe.runtime.checkpoint import json_text, safetensors_bytes
from balpoe.runtime.files import atomic_write, check_output_path
from balpoe.runtime.console import console
from balpoe.serve.build import Served, load_served
from balpoe.serve.serving import ServingModule, prior_offset, resolve_prior

#: export format -> default suffix (next to the checkpoint)
FORMATS = {"safetensors": ".safetensors", "torchscript": ".torchscript", "pt2": ".pt2", "onnx": ".onnx"}
METADATA_FORMAT = "balpoe-serving-module"
#: metadata keys of TorchScript / ONNX exports
METADATA_KEYS = ("format", "input", "output", "preprocess", "class_names", "prior", "recipe", "checkpoint")
#: agreement of the written file with the PyTorch module on a random batch
TOLERANCE = {"torchscript": 1e-5, "pt2": 1e-5, "onnx": 1e-4}
#: the ONNX graph's input / output names
INPUT_NAME, OUTPUT_NAME = "images", "logits"
_INSTALL = 'pip install "balpoe[export]"'


def default_path(checkpoint: str | Path, fmt: str) -> Path:
    """``CKPT`` with the format's suffix (``runs/x/last.pt`` -> ``runs/x/last.onnx``)."""
    return Path(checkpoint).with_suffix(FORMATS[fmt])


def serving_module(served: Served, prior: torch.Tensor | None = None) -> ServingModule:
    """The exported module of a served checkpoint: balanced logits, ``+ log q`` for a prior q."""
    module = ServingModule(served.model, served.preprocess.mean, served.preprocess.std,
                           prior_offset(served.class_counts, served.lam_model, prior))
    return module.cpu().float().eval().requires_grad_(False)


def export_metadata(served: Served, prior: torch.Tensor | None, spec) -> dict[str, str]:
    """The metadata of a TorchScript / ONNX export (module docstring): key -> JSON text."""
    pre = served.preprocess
    c, h, w = pre.input_size
    channels = "RGB" if c == 3 else "grey"
    meta = {
        "format": METADATA_FORMAT,
        "input": f"{INPUT_NAME}: float32 [B, {c}, {h}, {w}], values in [0, 1], {channels}, resized as 'preprocess' "
                 "says; normalised inside the module",
        "output": f"{OUTPUT_NAME}: float32 [B, {served.num_classes}], the ensemble's balanced logits"
                  + (" plus log(prior)" if prior is not None else "") + "; softmax gives class probabilities",
        "preprocess": pre.describe(),
        "class_names": served.class_names,
        "prior": {"spec": "uniform" if prior is None else str(spec),
                  "probabilities": None if prior is None else [float(v) for v in prior],
                  "logit_prior_exponent": served.lam_model,
                  "class_counts": [int(n) for n in served.class_counts]},
        "recipe": served.ckpt["recipe"],
        "checkpoint": {"path": served.path, "epoch": served.ckpt.get("epoch"), "taus": expert_taus(served.recipe.loss, served.recipe.model.num_experts)},
    }
    return {k: v if isinstance(v, str) else json_text(v, indent=None) for k, v in meta.items()}


def _write_checked(path: Path, write, check) -> float:
    """``write(f)`` to a temporary file beside ``path`` (:func:`~balpoe.runtime.files.atomic_write`),
    ``check(tmp)`` it, then rename it to ``path``: a failed or interrupted export never leaves a file
    under the final name, and the temporary file of a killed export is removed by the next one."""
    diff: list[float] = []
    atomic_write(path, write, check=lambda tmp: diff.append(check(str(tmp))))
    return diff[0]


def _example(served: Served, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, *served.preprocess.input_size, generator=g)


def _check(fmt: str, got: torch.Tensor, want: torch.Tensor) -> float:
    diff = float((got.float() - want.float()).abs().max())
    if not diff <= TOLERANCE[fmt]:
        raise BalpoeError(f"the exported {fmt} module's logits differ from the PyTorch module's by {diff:.3g} "
                          f"(tolerance {TOLERANCE[fmt]:g})")
    return diff


# ------------------------------------------------------------------------------------------------
# The three formats


def _export_safetensors(served: Served, path: Path) -> float:
    ckpt = dict(served.ckpt)
    ckpt["input_size"] = served.preprocess.input_size
    x = _example(served, 2)

    def check(tmp: str) -> float:
        loaded, _, _ = load_model(tmp)
        with torch.inference_mode():
            same = all(torch.equal(a, b) for a, b in zip(served.model.state_dict().values(),
                                                          loaded.state_dict().values()))
            if not same or not torch.equal(served.model(x), loaded(x)):
                raise BalpoeError(f"the weights file written for '{path}' does not reproduce the checkpoint's model")
        return 0.0

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in ckpt["model"].items()}
    return _write_checked(path, lambda f: f.write(safetensors_bytes(ckpt, tensors)), check)


def _export_torchscript(module: ServingModule, meta: dict[str, str], path: Path, served: Served) -> float:
    x, xb = _example(served, 2), _example(served, 3, 2)
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export; TorchScript is still what C++ (libtorch)
        # and older runtimes load, so it stays an export format.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        with torch.no_grad():
            traced = torch.jit.trace(module, (x,), check_inputs=[(_example(served, 3, 1),)])

        def check(tmp: str) -> float:
            with torch.no_grad():
                return _check("torchscript", torch.jit.load(tmp, map_location="cpu")(xb), module(xb))

        return _write_checked(path, lambda f: torch.jit.save(traced, f, _extra_files=meta), check)


def _export_pt2(module: ServingModule, meta: dict[str, str], path: Path, served: Served) -> float:
    """``torch.export``: an ``ExportedProgram`` with a dynamic batch axis, saved with
    ``torch.export.save`` (metadata as ``extra_files``); loads with ``torch.export.load(path).module()``."""
    x, xb = _example(served, 2), _example(served, 3, 2)
    try:
        with torch.no_grad():
            program = torch.export.export(module.eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as e:  # noqa: BLE001 - the exporter's failures are many kinds; one line names the cause
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise BalpoeError(f"torch.export of this model failed ({type(e).__name__}: {first})") from None

    def check(tmp: str) -> float:
        with torch.no_grad():
            return _check("pt2", torch.export.load(tmp).module()(xb), module(xb))

    return _write_checked(path, lambda f: torch.export.save(program, f, extra_files=meta), check)


def _onnx_modules():
    """The optional ONNX packages: onnxscript (used by torch's exporter), onnxruntime (the check)."""
    try:
        # Optional dependencies (the 'export' extra): imported only when an ONNX export is asked for.
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise BalpoeError(f"ONNX export needs the onnx, onnxscript and onnxruntime packages ({e.name or 'one'} is "
                          f"missing): {_INSTALL}") from None
    return onnxruntime


def _export_onnx(module: ServingModule, meta: dict[str, str], path: Path, served: Served) -> float:
    ort = _onnx_modules()
    x = _example(served, 2)
    big = sum(t.numel() * t.element_size() for t in module.state_dict().values()) > 1.5 * 2 ** 30
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            program = torch.onnx.export(module, (x,), None, dynamo=True, verbose=False, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
        except Exception as e:  # noqa: BLE001 - the exporter's failures are many kinds; one line names the cause
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise BalpoeError(f"ONNX export of this model failed ({type(e).__name__}: {first})") from None
    program.model.metadata_props.update(meta)
    xb = _example(served, 3, 2)

    def check(file: str) -> float:
        session = ort.InferenceSession(file, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: xb.numpy()})[0])
        with torch.no_grad():
            return _check("onnx", got, module(xb))

    if big:  # protobuf's 2 GiB limit: the weights go to a data file beside PATH, written in place
        program.save(str(path), external_data=True)
        return check(str(path))
    return _write_checked(path, lambda f: f.write(program.model_proto.SerializeToString()), check)


def export(checkpoint: str | Path, format: str, *, prior=None, out: str | Path | None = None,  # noqa: A002
           quiet: bool = False, overwrite: bool = True) -> dict[str, Any]:
    """Export a checkpoint (module docstring); returns ``{"path", "format", "metadata",
    "max_abs_diff"}`` (``metadata``: the JSON-decoded metadata of TorchScript / ONNX files).

    ``prior`` (TorchScript / ONNX): ``None`` / ``"uniform"`` for the balanced logits, or a target
    prior as :func:`~balpoe.serve.serving.resolve_prior` takes it; ``out``: default next to the
    checkpoint with the format's suffix (:data:`FORMATS`); ``overwrite=False`` refuses an existing file
    (:class:`~balpoe.errors.OutputExists`)."""
    if format not in FORMATS:
        raise BalpoeError(f"export format must be one of {', '.join(FORMATS)}; got {format!r}")
    if format == "safetensors" and prior not in (None, "uniform"):
        raise BalpoeError("a safetensors export holds the weights only; a target prior applies to the torchscript, "
                          "pt2 and onnx formats")
    path = Path(out) if out is not None else default_path(checkpoint, format)
    inputs = [checkpoint] + ([prior] if isinstance(prior, (str, Path)) else [])
    # never the checkpoint, the prior file or a run's files; the folder is created once the inputs are read
    check_output_path(path, "export output", inputs=inputs, create=False, overwrite=overwrite)
    if format == "onnx":
        _onnx_modules()  # fail before any work
    served = load_served(checkpoint, "cpu")
    q = resolve_prior(prior, served.class_counts, served.class_names)
    check_output_path(path, "export output", inputs=inputs, overwrite=overwrite)
    meta: dict[str, str] = {}
    if format == "safetensors":
        diff = _export_safetensors(served, path)
    else:
        module = serving_module(served, q)
        meta = export_metadata(served, q, prior)
        write = {"torchscript": _export_torchscript, "pt2": _export_pt2, "onnx": _export_onnx}[format]
        diff = write(module, meta, path, served)
    result = {"path": str(path), "format": format, "max_abs_diff": diff,
              "metadata": {k: _decode(v) for k, v in meta.items()}}
    if not quiet:
        console.print(f"saved {path}", markup=False)
        if format != "safetensors":
            c, h, w = served.preprocess.input_size
            kind = "prior-adjusted" if q is not None else "balanced"
            console.print(f"  {INPUT_NAME} float32 [B, {c}, {h}, {w}] in [0, 1] -> {OUTPUT_NAME} "
                          f"[B, {served.num_classes}] ({kind}); matches PyTorch to {diff:.1e}", markup=False)
    return result


def _decode(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an exported TorchScript or ONNX file (JSON values decoded)."""
    path = Path(path)
    if not path.is_file():
        raise BalpoeError(f"exported file '{path}' not found")
    if path.suffix == ".onnx":
        ort = _onnx_modules()
        try:
            props = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta() \
                .custom_metadata_map
        except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
            raise BalpoeError(f"'{path}' could not be read as an ONNX model ({type(e).__name__})") from None
    elif path.suffix == ".pt2":
        props = {k: "" for k in METADATA_KEYS}
        try:
            torch.export.load(str(path), extra_files=props)
        except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
            raise BalpoeError(f"'{path}' could not be read as a torch.export program ({type(e).__name__})") from None
        props = {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in props.items() if v}
    else:
        props = {k: "" for k in METADATA_KEYS}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; its files still load
                torch.jit.load(str(path), map_location="cpu", _extra_files=props)
        except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
            raise BalpoeError(f"'{path}' could not be read as a TorchScript module ({type(e).__name__})") from None
        props = {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in props.items() if v}
    if props.get("format") != METADATA_FORMAT:
        raise BalpoeError(f"'{path}' is not a balpoe export (no balpoe metadata)")
    return {k: _decode(v) for k, v in props.items()}
