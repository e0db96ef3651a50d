"""The input pipeline of each dataset (balpoe.data.pipeline): automatic choices from the images,
recipe keys, refusals of keys that do not apply, in-memory image folders, the official pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from formats import write_image_list
from PIL import Image
from torchvision import transforms as T

from balpoe import recipe_from_dict
from balpoe.data.augment import folder_transform
from balpoe.data.build import build_data, build_loader
from balpoe.data.device_loader import DeviceLoader
from balpoe.data.image_list import IMAGENET_MEAN, IMAGENET_STD
from balpoe.data.pipeline import luma
from balpoe.errors import BalpoeError


def _folder(root, counts: dict[str, int], size=(12, 12), mode="L", seed=0):
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / name / f"{i:03d}.png")
    return root


def _data(**kw):
    return recipe_from_dict({"data": {"num_workers": 0, **kw}}).data


def test_small_grey_folder_gets_the_cifar_pipeline_in_memory_with_its_own_statistics(tmp_path):
    train = _folder(tmp_path / "train", {"a": 9, "b": 4})
    test = _folder(tmp_path / "test", {"a": 2, "b": 3}, seed=1)
    b = build_data(_data(dataset="image_folder", train_root=str(train), test_root=str(test),
                         augment={"crop_padding": 2, "rotation": 5}))
    p = b.pipeline
    assert (p.crop, p.size, p.channels, p.padding, p.rotation, p.color_jitter, p.in_memory) == \
        ("pad_crop", 12, 1, 2, 5.0, False, True)
    assert b.in_memory and b.in_chans == 1 and b.train.images.dtype == torch.uint8
    # the decoded pixels are PIL's, the statistics the training split's own
    first = np.array(Image.open(train / "a" / "000.png"))
    assert torch.equal(b.train.images[0, 0], torch.from_numpy(first))
    pixels = b.train.images.double() / 255
    assert b.mean == (round(float(pixels.mean()), 4),) and b.std == (round(float(pixels.std(unbiased=False)), 4),)
    assert b.test.labels.tolist() == [0, 0, 1, 1, 1] and len(b.test.paths) == 5   # paths kept for test lists
    loader = build_loader(b, "train", 4, _data(dataset="image_folder", train_root=str(train), test_root=str(test)),
                          train=True)
    assert isinstance(loader, DeviceLoader) and (loader.padding, loader.rotation) == (2, 5.0)
    line = p.describe("image_folder", len(b.train))
    assert "13 training images 12x12 grey" in line and "pad-crop 2 + flip + rotation 5" in line
    assert "computed on the training split" in line and "in memory" in line


def test_large_rgb_folder_gets_the_imagenet_pipeline_from_files(tmp_path):
    train = _folder(tmp_path / "train", {"a": 3, "b": 2}, size=(80, 70), mode="RGB")
    b = build_data(_data(dataset="image_folder", root=str(train), test_fraction=0.2, image_size=32))
    p = b.pipeline
    assert (p.crop, p.channels, p.color_jitter, p.in_memory, p.test_resize) == \
        ("random_resized_crop", 3, True, False, 37)
    assert b.mean == IMAGENET_MEAN and not b.in_memory
    ops = [type(op) for op in b.train.pil_transform.transforms]
    assert ops[:3] == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ColorJitter]
    x, _ = b.train[0]
    assert x.shape == (3, 32, 32)


def test_recipe_keys_set_the_file_pipeline(tmp_path):
    train = _folder(tmp_path / "train", {"a": 3, "b": 2}, size=(80, 80), mode="RGB")
    b = build_data(_data(dataset="image_folder", root=str(train), test_fraction=0.2, image_size=48, in_memory=False,
                         channels=1, mean=[0.5], std=[0.25], test_crop_fraction=0.75,
                         augment={"crop_scale": [0.5, 1.0], "crop_ratio": [0.9, 1.1], "rotation": 10,
                                  "color_jitter": False, "flip": False}))
    tf = b.train.pil_transform.transforms
    assert (tf[0].scale, tf[0].ratio) == ((0.5, 1.0), (0.9, 1.1))
    assert [type(op) for op in tf] == [T.RandomResizedCrop, T.RandomRotation, T.ToTensor, T.Normalize]
    test_tf = b.test.pil_transform.transforms
    assert (test_tf[0].size, test_tf[1].size) == (64, (48, 48))      # 48 / 0.75
    x, _ = b.train[0]
    assert x.shape == (1, 48, 48) and b.mean == (0.5,)
    # pad-and-crop from files: test geometry, then RandomCrop with the padding
    b = build_data(_data(dataset="image_folder", root=str(train), test_fraction=0.2, image_size=40, in_memory=False,
                         augment={"crop": "pad_crop", "crop_padding": 3}))
    tf = b.train.pil_transform.transforms
    assert [type(op) for op in tf[:4]] == [T.Resize, T.CenterCrop, T.RandomCrop, T.RandomHorizontalFlip]
    assert tf[2].padding == 3 and b.pipeline.test_resize == 40


def test_official_list_datasets_keep_the_official_pipeline(tmp_path):
    root = write_image_list(tmp_path / "inlt", "imagenet_lt", 3, [6, 4, 2], 2, size=20)
    for augment in ({}, {"policy": "randaugment", "color_jitter": True}):
        cfg = _data(dataset="imagenet_lt", root=str(root), augment=augment)
        b = build_data(cfg)
        want_train = folder_transform(True, IMAGENET_MEAN, IMAGENET_STD, 224, color_jitter=True,
                                      policy=cfg.augment.policy)
        assert repr(b.train.pil_transform) == repr(want_train)
        assert repr(b.test.pil_transform) == repr(folder_transform(False, IMAGENET_MEAN, IMAGENET_STD, 224))
        assert not b.in_memory and b.in_chans == 3 and b.pipeline.test_resize == 256


def test_grey_conversion_is_pils():
    rgb = torch.randint(0, 256, (3, 9, 7), dtype=torch.uint8)
    pil = np.array(Image.fromarray(rgb.permute(1, 2, 0).numpy()).convert("L"))
    assert torch.equal(luma(rgb)[0], torch.from_numpy(pil))


@pytest.mark.parametrize("kw, message", [
    ({"augment": {"crop": "random_resized_crop", "crop_padding": 4}},
     "recipe key 'data.augment.crop_padding' does not apply to the crop random_resized_crop"),
    ({"augment": {"crop": "pad_crop", "crop_scale": [0.5, 1]}},
     "recipe key 'data.augment.crop_scale' does not apply to the crop pad_crop"),
    ({"in_memory": True, "augment": {"crop": "random_resized_crop"}},
     "recipe key 'data.in_memory' is true but the pipeline has random_resized_crop"),
    ({"in_memory": True, "augment": {"color_jitter": True}}, "recipe key 'data.in_memory' is true but the pipeline "
                                                             "has colour jitter"),
    ({"mean": [0.5, 0.5, 0.5], "std": [1, 1, 1]}, "recipe key 'data.mean' has 3 values but dataset 'image_folder' "
                                                  "has 1 channel(s)"),
])
def test_keys_that_do_not_apply_to_a_folder_are_refused(tmp_path, kw, message):
    train = _folder(tmp_path / "train", {"a": 3, "b": 2})
    with pytest.raises(BalpoeError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        build_data(_data(dataset="image_folder", root=str(train), test_fraction=0.2, **kw))


@pytest.mark.parametrize("kw, message", [
    ({"image_size": 32}, "recipe key 'data.image_size' does not apply to dataset 'fashion_mnist'"),
    ({"channels": 3}, "recipe key 'data.channels' does not apply to dataset 'fashion_mnist'"),
    ({"test_crop_fraction": 0.9}, "recipe key 'data.test_crop_fraction' does not apply"),
    ({"in_memory": False}, "recipe key 'data.in_memory' is false but dataset 'fashion_mnist' is always in memory"),
    ({"augment": {"color_jitter": True}}, "recipe key 'data.augment.color_jitter' does not apply"),
    ({"augment": {"crop": "random_resized_crop"}}, "recipe key 'data.augment.crop' random_resized_crop does not"),
    ({"augment": {"crop_scale": [0.5, 1]}}, "recipe key 'data.augment.crop_scale' does not apply to the crop "
                                            "pad_crop"),
    ({"augment": {"crop": "none", "crop_padding": 2}}, "recipe key 'data.augment.crop_padding' does not apply"),
])
def test_keys_that_do_not_apply_to_a_builtin_dataset_are_refused(fm_small_root, kw, message):
    with pytest.raises(BalpoeError, match="^" + message):
        build_data(_data(dataset="fashion_mnist", root=str(fm_small_root), imb_factor=10, **kw))


def test_builtin_defaults_are_unchanged_and_normalisation_can_be_computed(fm_small_root):
    b = build_data(_data(dataset="fashion_mnist", root=str(fm_small_root), imb_factor=10))
    assert (b.pipeline.padding, b.pipeline.rotation, b.pipeline.flip) == (4, 15.0, True)
    assert b.mean == (0.2860,)
    c = build_data(_data(dataset="fashion_mnist", root=str(fm_small_root), imb_factor=10, normalize="computed",
                         augment={"crop": "none"}))
    assert c.pipeline.padding == 0
    assert c.mean == (round(float(c.train.images.double().mean() / 255), 4),)


@pytest.mark.parametrize("kw, message", [
    ({"augment": {"crop_scale": [1.0, 0.5]}}, "recipe key 'data.augment.crop_scale' must be two increasing"),
    ({"mean": [0.5]}, "recipe keys 'data.mean' and 'data.std' go together"),
    ({"mean": [0.5], "std": [0.2], "normalize": "imagenet"}, "recipe key 'data.normalize' is imagenet but"),
])
def test_pipeline_keys_are_checked_with_the_recipe(kw, message):
    with pytest.raises(BalpoeError, match="^" + message):
        recipe_from_dict({"data": kw})
