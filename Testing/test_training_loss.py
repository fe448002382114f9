"""Masked BCE + Dice loss and the learning-rate schedule of the training package."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from universalseg_training.loss import masked_bce_dice_loss, naive_targets
from universalseg_training.trainer import warmup_cosine


def _batch(seed=0, shape=(2, 3, 4, 5, 6)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g)
    targets = (torch.rand(shape, generator=g) > 0.6).to(torch.uint8)
    return logits, targets


def test_value_is_mean_of_bce_and_dice_over_annotated_pairs():
    logits, targets = _batch()
    annotated = torch.tensor([[True, False, True], [False, False, True]])
    parts = masked_bce_dice_loss(logits, targets, annotated)
    expected_terms = []
    for b, k in [(0, 0), (0, 2), (1, 2)]:
        x, t = logits[b, k], targets[b, k].float()
        p = torch.sigmoid(x)
        bce = F.binary_cross_entropy_with_logits(x, t)
        dice = 1 - 2 * (p * t).sum() / (p.sum() + t.sum() + 1)
        expected_terms.append((bce, dice))
    bce = sum(t[0] for t in expected_terms) / 3
    dice = sum(t[1] for t in expected_terms) / 3
    assert parts.pairs == 3
    assert math.isclose(parts.bce, float(bce), rel_tol=1e-5)
    assert math.isclose(parts.dice, float(dice), rel_tol=1e-5)
    assert torch.isclose(parts.loss, bce + dice, rtol=1e-5)


def test_unannotated_classes_get_no_gradient_and_their_targets_do_not_matter():
    logits, targets = _batch(1)
    logits.requires_grad_(True)
    annotated = torch.tensor([[True, False, True], [False, True, False]])
    masked_bce_dice_loss(logits, targets, annotated).loss.backward()
    grad = logits.grad
    for b in range(2):
        for k in range(3):
            assert bool(grad[b, k].abs().sum() > 0) == bool(annotated[b, k])
    flipped = targets.clone()
    flipped[~annotated] = 1 - flipped[~annotated]  # change only unknown targets
    a = masked_bce_dice_loss(logits.detach(), targets, annotated).loss
    b = masked_bce_dice_loss(logits.detach(), flipped, annotated).loss
    assert torch.equal(a, b)


def test_per_slice_dice_matches_the_papers_definition():
    logits, targets = _batch(2)
    annotated = torch.ones(2, 3, dtype=torch.bool)
    parts = masked_bce_dice_loss(logits, targets, annotated, dice="slice")
    p, t = torch.sigmoid(logits), targets.float()
    per_slice = 2 * (p * t).sum((3, 4)) / (p.sum((3, 4)) + t.sum((3, 4)) + 1)  # slices along axis 0 of the crop
    assert math.isclose(parts.dice, float((1 - per_slice.mean(2)).mean()), rel_tol=1e-5)
    assert not math.isclose(parts.dice, masked_bce_dice_loss(logits, targets, annotated).dice, rel_tol=1e-3)


def test_no_annotated_pair_gives_a_zero_loss_with_a_graph():
    logits, targets = _batch(3)
    logits.requires_grad_(True)
    parts = masked_bce_dice_loss(logits, targets, torch.zeros(2, 3, dtype=torch.bool))
    assert parts.pairs == 0 and float(parts.loss.detach()) == 0.0
    parts.loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_naive_targets_turn_unknown_into_background():
    logits, targets = _batch(4)
    annotated = torch.tensor([[True, False, True], [False, True, False]])
    cleared, flags = naive_targets(targets, annotated, supervised=torch.tensor([True, True, False]))
    assert torch.equal(flags, torch.tensor([[True, True, False], [True, True, False]]))
    assert not cleared[0, 1].any() and not cleared[1, 0].any()  # unknown -> background
    assert torch.equal(cleared[0, 0], targets[0, 0])


def test_shape_and_mode_errors():
    logits, targets = _batch()
    with pytest.raises(ValueError, match="shape mismatch"):
        masked_bce_dice_loss(logits, targets[:, :2], torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="dice must be"):
        masked_bce_dice_loss(logits, targets, torch.ones(2, 3, dtype=torch.bool), dice="2d")


def test_warmup_cosine_schedule():
    values = [warmup_cosine(s, warmup=4, total=12) for s in range(12)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == 1.0 and all(a >= b for a, b in zip(values[4:], values[5:]))
    assert math.isclose(warmup_cosine(8, 4, 12), 0.5, abs_tol=1e-12)
    assert warmup_cosine(12, 4, 12, min_ratio=0.1) == pytest.approx(0.1)
