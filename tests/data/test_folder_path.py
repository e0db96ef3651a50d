"""The DataLoader path: image-folder datasets (txt lists) and the torchvision pipeline for arrays."""

import pytest
import torch
from formats import write_cifar, write_image_list

from balpoe import recipe_from_dict, train
from balpoe.data.build import build_data, build_loader
from balpoe.errors import BalpoeError


def test_imagenet_lt_lists_train_and_evaluate(tmp_path):
    root = write_image_list(tmp_path / "inlt", "imagenet_lt", 4, [12, 8, 5, 3], 3, size=40)
    recipe = recipe_from_dict({
        "name": "inlt", "data": {"dataset": "imagenet_lt", "root": str(root), "image_size": 32, "num_workers": 0,
                                 "many_threshold": 10, "few_threshold": 4},
        "model": {"backbone": "resnet20_cifar", "num_experts": 2, "split": "head", "head": "linear"},
        "loss": {"tau": [0.5, 1.5]},
        "optim": {"epochs": 1, "warmup_epochs": 0, "batch_size": 8, "schedule": "cosine"},
        "train": {"mixup_alpha": 0.2}})
    bundle = build_data(recipe.data)
    assert not bundle.in_memory and bundle.class_counts.tolist() == [12, 8, 5, 3]
    loader = build_loader(bundle, "train", 8, recipe.data, train=True)
    loader.set_epoch(0)
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    report = train(recipe, tmp_path / "run", show_progress=False, report=False)
    assert report["n"] == 12 and (tmp_path / "run" / "last.pt").is_file()


def test_class_balanced_sampler_on_folder_path(tmp_path):
    root = write_image_list(tmp_path / "p", "places_lt", 3, [30, 6, 2], 1, size=16)
    recipe = recipe_from_dict({"data": {"dataset": "places_lt", "root": str(root), "image_size": 16,
                                        "num_workers": 0, "sampler": "class_balanced"}})
    bundle = build_data(recipe.data)
    loader = build_loader(bundle, "train", 19, recipe.data, train=True)
    ys = []
    for epoch in range(20):
        loader.set_epoch(epoch)
        ys += [y for _, y in loader]
    counts = torch.bincount(torch.cat(ys), minlength=3).float()
    assert counts.sum() == 20 * 38
    assert (counts / counts.sum() - 1 / 3).abs().max() < 0.06


def test_device_and_torchvision_paths_see_the_same_unaugmented_data(tmp_path):
    root = write_cifar(tmp_path / "c", 10, 20, 5)
    recipe = recipe_from_dict({"data": {"dataset": "cifar10", "root": str(root), "imb_factor": 2}})
    bundle = build_data(recipe.data)
    fast = build_loader(bundle, "test", 50, recipe.data, train=False)
    recipe.data.loader = "dataloader"
    recipe.data.num_workers = 0
    slow = build_loader(bundle, "test", 50, recipe.data, train=False)
    (xf, yf), (xs, ys) = next(iter(fast)), next(iter(slow))
    assert torch.equal(yf, ys)
    assert torch.allclose(xf, xs, atol=1e-5)


def test_missing_folder_list_is_one_line_error(tmp_path):
    recipe = recipe_from_dict({"data": {"dataset": "imagenet_lt", "root": str(tmp_path)}})
    with pytest.raises(BalpoeError, match="ImageNet_LT_train.txt"):
        build_data(recipe.data)
    recipe = recipe_from_dict({"data": {"dataset": "imagenet_lt"}})
    with pytest.raises(BalpoeError, match="data.root"):
        build_data(recipe.data)
