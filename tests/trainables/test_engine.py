from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight

from cxrtune.trainables.config import TrialConfig
from cxrtune.trainables.engine import (
    NonFiniteLossError,
    epoch_indices,
    evaluate,
    loss_class_weights,
    train_one_epoch,
)
from cxrtune.trainables.models import create_model

SIZE = 16


def stripes_dataset(count: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes a CNN separates at once: horizontal vs vertical stripes."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(count) % 2
    stripes = (torch.arange(SIZE) % 4 < 2).to(torch.uint8) * 200
    images = torch.where(
        labels.view(-1, 1, 1, 1) == 0,
        stripes.view(1, 1, SIZE, 1).expand(count, 1, SIZE, SIZE),
        stripes.view(1, 1, 1, SIZE).expand(count, 1, SIZE, SIZE),
    ).clone()
    noise = torch.randint(0, 40, images.shape, generator=generator, dtype=torch.uint8)
    return images + noise, labels


def small_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    config = TrialConfig(family="regularized_cnn", lr=3e-3, batch_size=16, imbalance="none")
    model = create_model(config, num_classes=2, image_size=SIZE)
    return model, torch.optim.Adam(model.parameters(), lr=3e-3)


def test_training_epochs_lower_the_loss_and_separate_the_classes() -> None:
    images, labels = stripes_dataset()
    model, optimizer = small_model()
    generator = torch.Generator().manual_seed(0)
    losses = [
        train_one_epoch(
            model,
            optimizer,
            images,
            labels,
            torch.randperm(len(labels), generator=generator),
            batch_size=16,
        )
        for _ in range(6)
    ]
    assert losses[-1] < losses[0]
    _, probabilities = evaluate(model, images, labels)
    assert (probabilities.argmax(axis=1) == labels.numpy()).mean() > 0.9


def test_evaluate_returns_probabilities_that_sum_to_one() -> None:
    images, labels = stripes_dataset(10)
    model, _ = small_model()
    loss, probabilities = evaluate(model, images, labels, batch_size=3)
    assert probabilities.shape == (10, 2) and probabilities.dtype == np.float64
    assert np.allclose(probabilities.sum(axis=1), 1.0)
    assert np.isfinite(loss)


def test_a_non_finite_loss_stops_training_loudly() -> None:
    images, labels = stripes_dataset(32)
    model, optimizer = small_model()
    with torch.no_grad():
        model[-1].bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="nan"):
        train_one_epoch(model, optimizer, images, labels, torch.arange(32), batch_size=8)


def test_oversampling_balances_the_classes_in_expectation() -> None:
    labels = np.repeat([0, 1, 2, 3], [10, 100, 200, 90])
    generator = torch.Generator().manual_seed(0)
    drawn = torch.cat([epoch_indices(labels, "oversample", generator) for _ in range(20)])
    shares = np.bincount(labels[drawn.numpy()], minlength=4) / len(drawn)
    assert np.abs(shares - 0.25).max() < 0.02
    assert len(epoch_indices(labels, "oversample", generator)) == len(labels)


@pytest.mark.parametrize("imbalance", ["none", "class_weight"])
def test_without_oversampling_an_epoch_is_a_permutation(imbalance: str) -> None:
    labels = np.repeat([0, 1], [5, 50])
    order = epoch_indices(labels, imbalance, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(55))


def test_class_weights_are_scikit_learns_balanced_weights() -> None:
    labels = np.repeat([0, 1, 2], [10, 30, 60])
    weights = loss_class_weights(labels, 3, "class_weight")
    assert weights is not None
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    assert np.allclose(weights.numpy(), expected)
    assert loss_class_weights(labels, 3, "oversample") is None
