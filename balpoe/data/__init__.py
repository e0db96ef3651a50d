"""Data: the dataset registry and readers, long-tailed splits, samplers, augmentation, loaders, mixup.

* :mod:`~balpoe.data.registry` -- ``data.dataset`` name -> reader (CIFAR-10/100, Fashion-MNIST,
  ImageNet-LT, Places-LT, iNaturalist 2018; :func:`~balpoe.data.registry.register_dataset` adds one);
* :mod:`~balpoe.data.lt` -- long-tailed subsampling (Cao et al. 2019), many/medium/few groups,
  stratified held-out slices; :mod:`~balpoe.data.groups` -- the group rule without torch;
* :mod:`~balpoe.data.build` -- recipe ``data`` section -> :class:`~balpoe.data.bundle.DataBundle` -> loader;
* :mod:`~balpoe.data.device_loader` / :mod:`~balpoe.data.augment` -- device-resident data with
  per-sample augmentation in batches; :mod:`~balpoe.data.folder_loader` -- the ``DataLoader`` path;
* :mod:`~balpoe.data.samplers` -- instance- and class-balanced sampling; :mod:`~balpoe.data.mixup`.
"""

import importlib

# Imported on first use, so that a torch-free module of the package (groups) loads without torch.
_LAZY = {"balpoe.data.bundle": ("ArraySplit", "DataBundle", "FileSplit", "ImageArrays"),
         "balpoe.data.registry": ("DATASETS", "DatasetSpec", "register_dataset")}


def __getattr__(name: str):
    for module, names in _LAZY.items():
        if name in names:
            return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'balpoe.data' has no attribute {name!r}")


__all__ = ["DATASETS", "ArraySplit", "DataBundle", "DatasetSpec", "FileSplit", "ImageArrays", "register_dataset"]
