"""The power-function EMA (ema.py): its length, its independence of the batch size, and the post-hoc reconstruction of
an EMA of any length from the snapshots of two."""

from __future__ import annotations

import pytest
import torch

import ema


@pytest.mark.parametrize("length", [0.02, 0.05, 0.10, 0.2])
def test_length_and_exponent_are_inverse(length):
    assert ema.exponent_to_length(ema.length_to_exponent(length)) == pytest.approx(length, rel=1e-9)


def test_the_length_is_counted_in_images_not_steps():
    """Weights that drift linearly with the images seen: the same EMA at 64,000 images whether it took 8,000 steps of
    8 images or 1,000 steps of 64 (the averaging profile's sigma_rel times the images, not the steps)."""
    results = []
    for batch in (8, 64):
        weight = torch.zeros(1)
        tracker = ema.PowerEMA([weight], (0.10,))
        for images in range(batch, 64_001, batch):
            weight.fill_(images / 64_000)
            tracker.step([weight], batch)
        results.append(tracker.averages[0][0].item())
    # The power-function profile averages tau/t with weights ~ tau^gamma: (gamma + 1) / (gamma + 2).
    gamma = ema.length_to_exponent(0.10)
    assert results[0] == pytest.approx((gamma + 1) / (gamma + 2), abs=2e-4)
    assert results[1] == pytest.approx(results[0], abs=1e-3)


def test_posthoc_rebuilds_an_ema_that_was_not_tracked(tmp_path):
    """A random walk of 400 steps, snapshots of the 0.05 and 0.10 EMAs every 20 steps (20 of each): the EMAs of
    lengths 0.07 and 0.15, tracked directly for comparison, are rebuilt within 0.5% of their distance from the raw
    weights; a short one (0.03) within 1.5%."""
    torch.manual_seed(0)
    weights = torch.zeros(50)
    tracker = ema.PowerEMA([weights], (0.05, 0.10, 0.07, 0.15, 0.03))
    for step in range(1, 401):
        weights += 0.1 * torch.randn(50)
        tracker.step([weights], 8)
        if step % 20 == 0:
            assert len(tracker.snapshot(tmp_path, ["w"])) == 2  # only the two post-hoc lengths
    assert len(ema.list_snapshots(tmp_path)) == 40
    for index, length, tolerance in ((2, 0.07, 0.005), (3, 0.15, 0.005), (4, 0.03, 0.015)):
        rebuilt, coefficients = ema.reconstruct(tmp_path, length)
        truth = tracker.averages[index][0]
        assert (rebuilt["w"] - truth).norm() < tolerance * (truth - weights).norm(), length
        assert coefficients.sum() == pytest.approx(1.0)
    # An earlier time: the snapshots after it are not used; dropping them leaves the same answer.
    early, _ = ema.reconstruct(tmp_path, 0.10, images=200 * 8)
    ema.drop_snapshots_after(tmp_path, 200 * 8)
    assert max(seen for seen, _, _ in ema.list_snapshots(tmp_path)) == 200 * 8
    assert torch.equal(ema.reconstruct(tmp_path, 0.10)[0]["w"], early["w"])
