"""Metrics: accuracy, group accuracy, ECE/MCE against a direct NumPy loop, NLL, Brier, report."""

import math

import numpy as np
import pytest
import torch

from balpoe.errors import BalpoeError
from balpoe.evaluate.metrics import (accuracy, brier_score, calibration_bins, classification_report,
                            expected_calibration_error, group_accuracies, maximum_calibration_error,
                            negative_log_likelihood)


def numpy_ece_mce(logits: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> tuple[float, float]:
    """Reference: loop over bins (lower, upper], as in the reference calibration_metrics.py."""
    z = logits - logits.max(1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    conf, pred = probs.max(1), probs.argmax(1)
    correct = (pred == labels).astype(float)
    ece, mce = 0.0, 0.0
    for b in range(n_bins):
        lower, upper = b / n_bins, (b + 1) / n_bins
        in_bin = (conf > lower) & (conf <= upper)
        if in_bin.sum() > 0:
            gap = abs(correct[in_bin].mean() - conf[in_bin].mean())
            ece += in_bin.mean() * gap
            mce = max(mce, gap)
    return ece * 100, mce * 100


@pytest.mark.parametrize("seed,num_classes,scale", [(0, 10, 1.0), (1, 100, 3.0), (2, 2, 5.0), (3, 1000, 8.0)])
def test_ece_mce_match_numpy_loop(seed, num_classes, scale):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(3000, num_classes)) * scale
    labels = rng.integers(0, num_classes, 3000)
    # make accuracy non-trivial: half the samples get the argmax as label
    labels[:1500] = logits[:1500].argmax(1)
    ref_ece, ref_mce = numpy_ece_mce(logits, labels)
    t_logits, t_labels = torch.from_numpy(logits), torch.from_numpy(labels)
    assert expected_calibration_error(t_logits, t_labels) == pytest.approx(ref_ece, abs=1e-9)
    assert maximum_calibration_error(t_logits, t_labels) == pytest.approx(ref_mce, abs=1e-9)
    # float32 logits give the same answer up to float32 rounding
    assert expected_calibration_error(t_logits.float(), t_labels) == pytest.approx(ref_ece, abs=1e-3)
    for n_bins in (5, 10, 20):
        e, m = numpy_ece_mce(logits, labels, n_bins)
        assert expected_calibration_error(t_logits, t_labels, n_bins) == pytest.approx(e, abs=1e-9)
        assert maximum_calibration_error(t_logits, t_labels, n_bins) == pytest.approx(m, abs=1e-9)


def test_bin_edges_go_to_the_lower_bin():
    conf = torch.tensor([1 / 15, 2 / 15, 14 / 15, 1.0, 0.5, 1 / 15 + 1e-12, 0.0], dtype=torch.float64)
    correct = torch.ones_like(conf)
    count, _, _ = calibration_bins(conf, correct, 15)
    expected = torch.zeros(15, dtype=torch.float64)
    for b in (0, 1, 13, 14, 7, 1, 0):  # 1/15 -> bin 0, 2/15 -> bin 1, 14/15 -> bin 13, 1 -> bin 14
        expected[b] += 1
    assert torch.equal(count, expected)


def two_class_logits(conf: float, n: int) -> torch.Tensor:
    return torch.tensor([[math.log(conf), math.log(1 - conf)]] * n, dtype=torch.float64)


def test_all_correct_and_all_wrong():
    logits = two_class_logits(0.6, 50)
    right = torch.zeros(50, dtype=torch.long)
    wrong = torch.ones(50, dtype=torch.long)
    assert expected_calibration_error(logits, right) == pytest.approx(40.0)
    assert maximum_calibration_error(logits, right) == pytest.approx(40.0)
    assert expected_calibration_error(logits, wrong) == pytest.approx(60.0)
    assert maximum_calibration_error(logits, wrong) == pytest.approx(60.0)
    assert accuracy(logits, right) == 100.0 and accuracy(logits, wrong) == 0.0
    # confident and correct: ECE ~ 0
    sharp = torch.tensor([[30.0, 0.0, 0.0]] * 20)
    assert expected_calibration_error(sharp, torch.zeros(20, dtype=torch.long)) < 1e-9
    # a perfectly calibrated bin: conf 0.8, 80% correct
    labels = torch.tensor([0] * 40 + [1] * 10)
    assert expected_calibration_error(two_class_logits(0.8, 50), labels) == pytest.approx(0.0, abs=1e-9)


def test_mce_ignores_empty_bins_and_takes_the_worst():
    logits = torch.cat([two_class_logits(0.55, 10), two_class_logits(0.95, 30)])
    labels = torch.tensor([0] * 10 + [0] * 15 + [1] * 15)  # bin of 0.55: gap .45; bin of .95: gap .45
    assert maximum_calibration_error(logits, labels) == pytest.approx(45.0)
    assert expected_calibration_error(logits, labels) == pytest.approx(45.0)


def test_group_accuracies_are_class_means():
    logits = torch.eye(4)[[0, 0, 1, 2, 2, 3, 3, 3]].double()  # predictions
    labels = torch.tensor([0, 1, 1, 2, 0, 3, 3, 3])
    groups = torch.tensor([0, 0, 1, 2])
    out = group_accuracies(logits, labels, groups)
    # class 0: 1/2, class 1: 1/2 -> many 50; class 2: 1/1 -> medium 100; class 3: 3/3 -> few 100
    assert out == pytest.approx({"many": 50.0, "medium": 100.0, "few": 100.0})
    assert accuracy(logits, labels) == pytest.approx(100 * 6 / 8)
    out = group_accuracies(logits[:2], labels[:2], groups)
    assert out["many"] == 50.0 and math.isnan(out["medium"]) and math.isnan(out["few"])


def test_nll_brier_and_report():
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(200, 7)) * 2)
    labels = torch.from_numpy(rng.integers(0, 7, 200))
    probs = logits.softmax(-1).numpy()
    lab = labels.numpy()
    assert negative_log_likelihood(logits, labels) == pytest.approx(-np.log(probs[np.arange(200), lab]).mean())
    onehot = np.eye(7)[lab]
    assert brier_score(logits, labels) == pytest.approx(((probs - onehot) ** 2).sum(1).mean())
    report = classification_report(logits, labels, torch.tensor([500, 200, 101, 100, 50, 20, 5]))
    assert set(report) == {"n", "acc", "many", "medium", "few", "ece", "mce", "nll", "brier"}
    assert report["n"] == 200
    assert report["ece"] == pytest.approx(numpy_ece_mce(logits.numpy(), lab)[0])


def test_bad_inputs_raise_one_line_errors():
    logits = torch.zeros(5, 3)
    for bad_labels in (torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 2, 3, 0]),
                       torch.tensor([0, 1, -1, 0, 0]), torch.zeros(5)):
        with pytest.raises(BalpoeError):
            expected_calibration_error(logits, bad_labels)
    with pytest.raises(BalpoeError):
        accuracy(torch.zeros(5), torch.zeros(5, dtype=torch.long))
    with pytest.raises(BalpoeError):
        calibration_bins(torch.ones(3), torch.ones(3), 0)
    with pytest.raises(BalpoeError):
        group_accuracies(logits, torch.zeros(5, dtype=torch.long), torch.zeros(4, dtype=torch.long))
