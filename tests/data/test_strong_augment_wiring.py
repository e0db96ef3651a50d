"""Strong augmentation wired into both data paths, in the official order.

Device path: crop -> flip -> rotation -> policy -> Cutout -> normalise (BalPoE's long CIFAR regime:
crop, flip, AutoAugment; Cutout after ToTensor, before Normalize).  Image files: RandomResizedCrop ->
flip -> ColorJitter(0.4, 0.4, 0.4, 0) -> RandAugment (timm, img_mean = dataset mean) -> ToTensor ->
Cutout -> Normalize (the official ImageNet-LT / iNaturalist long regime).
"""

import pytest
import torch
from timm.data.auto_augment import RandAugment
from torchvision import transforms as T

from balpoe.data.augment import Cutout, augment_batch, folder_transform, random_crop_flip, random_rotation
from balpoe.data.autoaugment import autoaugment_cifar10, cutout, rand_augment
from balpoe.data.device_loader import DeviceLoader
from balpoe.data.folder_loader import array_transforms
from balpoe.errors import BalpoeError
from balpoe.recipe import recipe_from_dict
from balpoe.training.build import check_names

X = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)


def _gen(seed=3):
    return torch.Generator().manual_seed(seed)


def test_device_path_order_is_crop_flip_rotation_policy_cutout():
    got = augment_batch(X, 2, True, 10.0, _gen(), policy="autoaugment_cifar10", cutout_length=6)
    g = _gen()
    x = random_crop_flip(X, 2, True, g)
    x = random_rotation(x.float(), 10.0, g).to(torch.uint8)
    x = cutout(autoaugment_cifar10(x, g), 6, g)
    assert torch.equal(got, x.float())
    # RandAugment fills with the given colour (the dataset mean)
    got = augment_batch(X, 0, False, 0.0, _gen(), policy="randaugment", fill=(10, 20, 30))
    assert torch.equal(got, rand_augment(X, _gen(), "rand-n2-m10-mstd0.5", fill=(10, 20, 30)).float())


def test_without_a_policy_the_device_path_is_unchanged():
    g1, g2 = _gen(), _gen()
    got = augment_batch(X, 4, True, 15.0, g1)
    want = random_rotation(random_crop_flip(X, 4, True, g2).float(), 15.0, g2)
    assert torch.equal(got, want)


def test_device_loader_draws_the_policy_per_sample_and_per_epoch():
    same = X[:1].expand(16, -1, -1, -1).contiguous()
    labels = torch.zeros(16, dtype=torch.long)
    loader = DeviceLoader(same, labels, 16, [0.5] * 3, [0.25] * 3, train=True,
                          strong={"policy": "trivialaugment", "cutout_length": 4})
    loader.set_epoch(0)
    (a, _), = list(loader)
    assert len({tuple(v.flatten()[:64].tolist()) for v in a}) > 8        # samples differ
    loader.set_epoch(0)
    (b, _), = list(loader)
    assert torch.equal(a, b)                                              # an epoch replays exactly
    loader.set_epoch(1)
    (c, _), = list(loader)
    assert not torch.equal(a, c)
    assert loader.strong["fill"] == (128, 128, 128)                       # RandAugment fill: mean * 255


def test_image_file_long_regime_pipeline():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    tf = folder_transform(True, mean, std, 224, color_jitter=True, policy="randaugment", cutout_length=16)
    kinds = [type(t) for t in tf.transforms]
    assert kinds == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ColorJitter, RandAugment, T.ToTensor, Cutout,
                     T.Normalize]
    rrc, _, cj, ra = tf.transforms[:4]
    assert rrc.size == (224, 224) and rrc.scale == (0.08, 1.0)
    assert cj.brightness == cj.contrast == cj.saturation == pytest.approx((0.6, 1.4)) and cj.hue is None
    assert ra.num_layers == 2 and len(ra.ops) == 15
    op = ra.ops[0]
    assert op.magnitude == 10 and op.hparams["magnitude_std"] == 0.5 and op.prob == 0.5
    assert op.hparams["img_mean"] == (124, 116, 104) and op.hparams["translate_pct"] == 0.45
    test = folder_transform(False, mean, std, 224, policy="randaugment")
    assert [type(t) for t in test.transforms] == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    with pytest.raises(BalpoeError):
        folder_transform(True, mean, std, policy="randaugment", randaugment="rand-q9")


def test_cutout_of_a_tensor_zeroes_one_square():
    torch.manual_seed(0)
    img = torch.ones(3, 32, 32)
    out = Cutout(16)(img)
    zeros = (out == 0).all(0)
    rows, cols = zeros.any(1).sum().item(), zeros.any(0).sum().item()
    assert zeros.sum().item() == rows * cols and rows <= 16 and cols <= 16 and zeros.any()


def test_the_dataloader_twin_of_the_device_path_has_the_policy():
    tf = array_transforms((32, 32), (0.5,) * 3, (0.25,) * 3, True, 4, True, 0.0, policy="autoaugment_cifar10",
                          cutout_length=8)
    assert [type(t) for t in tf.transforms] == [T.RandomCrop, T.RandomHorizontalFlip, T.AutoAugment, T.ToTensor,
                                                Cutout, T.Normalize]
    assert tf.transforms[2].policy == T.AutoAugmentPolicy.CIFAR10


def test_a_malformed_randaugment_string_stops_before_anything_is_written():
    r = recipe_from_dict({"data": {"dataset": "cifar10", "augment": {"policy": "randaugment",
                                                                       "randaugment": "rand-n2-zz"}}})
    with pytest.raises(BalpoeError, match="rand-n2-zz"):
        check_names(r)


def test_policy_fill_overrides_each_policy_fill_on_the_device_path():
    from balpoe.data.autoaugment import autoaugment_cifar10_official
    # the official CIFAR10Policy: grey 128 unless data.augment.fill says otherwise
    got = augment_batch(X, 0, False, 0.0, _gen(), policy="autoaugment_cifar10_official", fill=(1, 2, 3))
    assert torch.equal(got, autoaugment_cifar10_official(X, _gen(), fill=128).float())
    got = augment_batch(X, 0, False, 0.0, _gen(), policy="autoaugment_cifar10_official", policy_fill=(9, 9, 9))
    assert torch.equal(got, autoaugment_cifar10_official(X, _gen(), fill=(9, 9, 9)).float())
    # RandAugment: the recipe's fill (iNat long: the ImageNet mean) over the dataset mean
    got = augment_batch(X, 0, False, 0.0, _gen(), policy="randaugment", fill=(10, 20, 30), policy_fill=(124, 116, 104))
    assert torch.equal(got, rand_augment(X, _gen(), "rand-n2-m10-mstd0.5", fill=(124, 116, 104)).float())
    # torchvision's AutoAugment: fill 0 unless given
    got = augment_batch(X, 0, False, 0.0, _gen(), policy="autoaugment_cifar10", policy_fill=(50, 50, 50))
    assert torch.equal(got, autoaugment_cifar10(X, _gen(), fill=(50, 50, 50)).float())


def test_official_policy_on_the_dataloader_path_and_fill_checks(tmp_path):
    from PIL import Image

    from balpoe.data.augment import OfficialCIFAR10Policy, policy_transform
    tf = policy_transform("autoaugment_cifar10_official", "rand-n2-m10-mstd0.5", (0, 0, 0), None)
    assert isinstance(tf, OfficialCIFAR10Policy) and tf.fill == 128
    img = Image.fromarray(X[0].permute(1, 2, 0).numpy())
    torch.manual_seed(0)
    outs = {tf(img).tobytes() for _ in range(40)}
    assert len(outs) > 5 and tf(img).size == img.size and tf(img).mode == "RGB"
    grey = Image.fromarray(X[0, 0].numpy())
    assert tf(grey).mode == "L"
    assert policy_transform("autoaugment_cifar10_official", "", (0,), None, (7, 7, 7)).fill == (7, 7, 7)
    with pytest.raises(BalpoeError, match=r"recipe key 'data.augment.fill\[0\]' must be <= 255, got 256"):
        recipe_from_dict({"data": {"augment": {"fill": [256]}}})


def test_fill_must_match_the_channels(fm_small_root):
    from balpoe.data.build import build_data, build_loader
    cfg = recipe_from_dict({"data": {"dataset": "fashion_mnist", "root": str(fm_small_root), "imb_factor": 1,
                                     "augment": {"policy": "autoaugment_cifar10_official",
                                                 "fill": [124, 116, 104]}}}).data
    bundle = build_data(cfg)
    with pytest.raises(BalpoeError, match=r"recipe key 'data.augment.fill' needs one value or one per channel "
                                          r"\(1\), got 3"):
        build_loader(bundle, "train", 16, cfg, train=True)
    cfg.augment.fill = [200]
    x, _ = next(iter(build_loader(bundle, "train", 16, cfg, train=True)))
    assert x.shape[1] == 1
