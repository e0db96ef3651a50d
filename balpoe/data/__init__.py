"""Data: the dataset registry and readers, long-tailed splits, samplers, augmentation, loaders, mixup.

* :mod:`~balpoe.data.registry` -- ``data.dataset`` name -> reader (CIFAR-10/100, Fashion-MNIST,
  ImageNet-LT, Places-LT, iNaturalist 2018; :func:`~balpoe.data.registry.register_dataset` adds one);
* :mod:`~balpoe.data.lt` -- long-tailed subsampling (Cao et al. 2019), many/medium/few groups,
  stratified held-out slices;
* :mod:`~balpoe.data.build` -- recipe ``data`` section -> :class:`~balpoe.data.bundle.DataBundle` -> loader;
* :mod:`~balpoe.data.device_loader` / :mod:`~balpoe.data.augment` -- device-resident data with
  per-sample augmentation in batches; :mod:`~balpoe.data.folder_loader` -- the ``DataLoader`` path;
* :mod:`~balpoe.data.samplers` -- instance- and class-balanced sampling; :mod:`~balpoe.data.mixup`.
"""

from balpoe.data.bundle import ArraySplit, DataBundle, FileSplit, ImageArrays
from balpoe.data.registry import DATASETS, DatasetSpec, register_dataset

__all__ = ["DATASETS", "ArraySplit", "DataBundle", "DatasetSpec", "FileSplit", "ImageArrays", "register_dataset"]
