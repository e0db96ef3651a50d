"""Using a trained model: predictions on image files and exported inference modules.

* :func:`balpoe.serve.predict.predict` (``balpoe predict CKPT IMAGE_OR_FOLDER ...``): the
  checkpoint's test transform on image files, the ensemble's balanced logits, optionally adjusted
  to a given target prior or to one estimated from the images themselves (the test-time tau
  selector), top-k classes per image.
* :func:`balpoe.serve.export.export` (``balpoe export CKPT --format ...``): the weights as a
  safetensors file, or one TorchScript / ONNX module that maps a float image batch in [0, 1] to
  the (prior-adjusted) balanced ensemble logits, with its preprocessing constants, class names,
  prior and recipe in the file's metadata.

Layers: :mod:`~balpoe.serve.serving` holds the plain pieces (the exported module, the
preprocessing, image files, prior files), :mod:`~balpoe.serve.build` turns a checkpoint and its
recipe into them.
"""
