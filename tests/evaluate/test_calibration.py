"""Temperature scaling, BCTS and the stratified holdout split."""

import numpy as np
import pytest
import torch

from balpoe.evaluate.calibration import apply_calibration, fit_bcts, fit_temperature
from balpoe.errors import BalpoeError
from balpoe.evaluate.metrics import expected_calibration_error, negative_log_likelihood


def calibrated_sample(n: int, num_classes: int, seed: int, scale: float = 2.0, offset=None):
    """Logits z and labels drawn from softmax(z + offset): z is calibrated by construction."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, num_classes, generator=g, dtype=torch.float64) * scale
    shift = 0.0 if offset is None else offset
    labels = torch.multinomial(torch.softmax(z + shift, 1), 1, generator=g).squeeze(1)
    return z, labels


@pytest.mark.parametrize("true_t", [3.0, 0.5])
def test_temperature_scaling_recovers_t_and_lowers_nll(true_t):
    z, y = calibrated_sample(20000, 10, seed=0)
    distorted = z * true_t  # over-confident for T > 1, under-confident for T < 1
    t = fit_temperature(distorted, y)
    assert t == pytest.approx(true_t, rel=0.03)
    fixed = apply_calibration(distorted, t)
    assert negative_log_likelihood(fixed, y) < negative_log_likelihood(distorted, y) - 0.05
    assert expected_calibration_error(fixed, y) < 2.0 < expected_calibration_error(distorted, y)
    # float32 input gives the same fit (computations run in float64)
    assert fit_temperature(distorted.float(), y) == pytest.approx(t, rel=1e-4)


def test_temperature_with_offset():
    """Balanced logits scored on a long-tailed holdout: softmax(z / T + log pi)."""
    log_pi = torch.log(torch.softmax(torch.linspace(2, -2, 10, dtype=torch.float64), 0))
    z, y = calibrated_sample(20000, 10, seed=1, offset=log_pi)
    assert fit_temperature(z * 2.0, y, offset=log_pi) == pytest.approx(2.0, rel=0.03)
    # ignoring the offset gives a different (wrong) temperature
    assert abs(fit_temperature(z * 2.0, y) - 2.0) > 0.1


def test_bcts_recovers_temperature_and_biases():
    num_classes = 10
    bias = torch.linspace(-1, 1, num_classes, dtype=torch.float64)
    z, y = calibrated_sample(40000, num_classes, seed=2)
    distorted = (z - bias) * 1.5  # true model: distorted / 1.5 + bias
    t, b = fit_bcts(distorted, y)
    assert t == pytest.approx(1.5, rel=0.03)
    assert b.shape == (num_classes,) and abs(float(b.mean())) < 1e-9
    assert (b - bias).abs().max() < 0.06
    nll_ts = negative_log_likelihood(apply_calibration(distorted, fit_temperature(distorted, y)), y)
    assert negative_log_likelihood(apply_calibration(distorted, t, b), y) < nll_ts


def test_bcts_with_an_absent_class_stays_finite():
    z, y = calibrated_sample(3000, 5, seed=3)
    keep = y != 4
    t, b = fit_bcts(z[keep], y[keep])
    assert np.isfinite(t) and torch.isfinite(b).all() and b[4] < b[:4].min()


def test_calibration_errors():
    z, y = calibrated_sample(10, 3, seed=0)
    with pytest.raises(BalpoeError):
        fit_temperature(z, y[:5])
    with pytest.raises(BalpoeError):
        fit_temperature(z[:, :2], y.clamp_min(2))
    with pytest.raises(BalpoeError):
        fit_temperature(z, y, offset=torch.zeros(4))
    with pytest.raises(BalpoeError):
        apply_calibration(z, 0.0)
    with pytest.raises(BalpoeError):
        apply_calibration(z, 1.0, torch.zeros(4))
    z[0, 0] = float("nan")
    with pytest.raises(BalpoeError):
        fit_bcts(z, y)


def test_reliability_diagram_writes_a_png_of_the_expected_size(tmp_path):
    from PIL import Image

    from balpoe.evaluate.reliability import reliability_data, reliability_diagram

    z, y = calibrated_sample(3000, 10, seed=4)
    logits = (z * 2.5).float()  # over-confident
    data = reliability_data(logits, y)
    assert data.ece == pytest.approx(expected_calibration_error(logits, y), abs=1e-9)
    assert sum(data.count) == 3000 and len(data.edges) == 16
    path = reliability_diagram(logits, y, tmp_path / "rel.png", title="synthetic", size=(640, 400))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (640, 400)
        # not blank: the accuracy bars' blue is there
        assert (59, 111, 182) in {c for _, c in img.convert("RGB").getcolors(1 << 20)}
    with pytest.raises(BalpoeError):
        reliability_diagram(logits, y, tmp_path / "x.png", size=(50, 50))


def test_reliability_legend_shows_both_gap_colours_and_bin_counts():
    from matplotlib.colors import to_hex

    from balpoe.evaluate.reliability import reliability_data
    from balpoe.evaluate.reliability_plot import OVER_COLOUR, UNDER_COLOUR, reliability_figure

    z, y = calibrated_sample(3000, 10, seed=4)
    data = reliability_data((z * 2.5).float(), y)             # over-confident only: both gaps still in the legend
    ax = reliability_figure(data, "t", 480, 480).axes[0]
    legend = ax.get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["accuracy", "gap: over-confident", "gap: under-confident", "numbers: images per bin"]
    colours = [to_hex(h.get_facecolor()[:3]) for h in legend.legend_handles[1:3]]
    assert colours == [OVER_COLOUR, UNDER_COLOUR]
    counts = [int(t.get_text().replace(",", "")) for t in ax.texts]
    assert counts == [n for n in data.count if n] and sum(counts) == 3000
