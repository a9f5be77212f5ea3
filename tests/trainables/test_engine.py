from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight

from cxrtune.trainables import engine
from cxrtune.trainables.config import TrialConfig
from cxrtune.trainables.engine import (
    NonFiniteLossError,
    Precision,
    choose_precision,
    epoch_indices,
    epoch_seed,
    evaluate,
    grad_scaler,
    loss_class_weights,
    shard_for_rank,
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


def test_a_gpu_with_bf16_trains_in_bf16_an_older_one_in_fp16_and_a_cpu_in_fp32() -> None:
    cuda = torch.device("cuda")
    assert choose_precision(cuda, bf16_supported=lambda: True) == "bf16"
    assert choose_precision(cuda, bf16_supported=lambda: False) == "fp16"
    assert choose_precision(torch.device("cpu"), bf16_supported=lambda: True) == "fp32"
    assert grad_scaler(torch.device("cpu"), "fp16") is not None
    assert grad_scaler(torch.device("cpu"), "bf16") is None


def output_dtypes(model: torch.nn.Module) -> list[torch.dtype]:
    """Records the dtype of every forward pass's output."""
    seen: list[torch.dtype] = []
    model.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    return seen


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_the_forward_pass_in_half_and_keeps_float32_weights(
    precision: Precision,
) -> None:
    images, labels = stripes_dataset()
    model, optimizer = small_model()
    dtypes = output_dtypes(model)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    scaler = grad_scaler(images.device, precision)
    loss = train_one_epoch(
        model,
        optimizer,
        images,
        labels,
        torch.arange(len(labels)),
        batch_size=16,
        precision=precision,
        scaler=scaler,
    )
    half = torch.bfloat16 if precision == "bf16" else torch.float16
    assert dtypes and set(dtypes) == {half}
    assert np.isfinite(loss)
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    _, probabilities = evaluate(model, images, labels, precision=precision)
    assert probabilities.dtype == np.float64 and np.allclose(probabilities.sum(axis=1), 1.0)


def test_fp16_without_a_grad_scaler_is_refused() -> None:
    images, labels = stripes_dataset(8)
    model, optimizer = small_model()
    with pytest.raises(ValueError, match="GradScaler"):
        train_one_epoch(
            model, optimizer, images, labels, torch.arange(8), batch_size=4, precision="fp16"
        )


class NanAfter(torch.nn.Module):
    """Passes logits through until its ``limit``-th call, then turns them into NaN."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.calls = limit, 0

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return logits * float("nan") if self.calls > self.limit else logits


def test_a_loss_that_turns_nan_mid_epoch_stops_training_within_the_check_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine, "NON_FINITE_CHECK_STEPS", 2)
    images, labels = stripes_dataset(64)
    model, optimizer = small_model()
    poison = NanAfter(limit=3)
    with pytest.raises(NonFiniteLossError, match=r"nan at step 3 \(after 24 examples\)"):
        train_one_epoch(
            torch.nn.Sequential(model, poison),
            optimizer,
            images,
            labels,
            torch.arange(64),
            batch_size=8,
        )
    assert poison.calls == 4  # checked after steps 2 and 4 of 8, so it stopped at 4


def test_the_loss_is_read_on_the_host_once_in_an_epoch_shorter_than_the_check_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checks: list[int] = []
    original = engine._NonFiniteWatch.raise_if_seen
    monkeypatch.setattr(
        engine._NonFiniteWatch,
        "raise_if_seen",
        lambda self: (checks.append(1), original(self))[1],
    )
    images, labels = stripes_dataset(64)
    model, optimizer = small_model()
    train_one_epoch(model, optimizer, images, labels, torch.arange(64), batch_size=4)
    assert len(checks) == 1  # 16 steps, one check at the end


def test_worker_shards_cover_the_epoch_equally_and_rebuild_its_batches() -> None:
    order = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    shards = [shard_for_rank(order, rank, 3) for rank in range(3)]
    assert [len(shard) for shard in shards] == [4, 4, 4]
    assert set(torch.cat(shards).tolist()) == set(range(11))
    # With 2 examples per worker, the workers' k-th batches are the k-th batch of 6.
    padded = torch.cat([order, order[:1]])
    for k in range(2):
        together = torch.cat([shard[2 * k : 2 * k + 2] for shard in shards])
        assert sorted(together.tolist()) == sorted(padded[6 * k : 6 * k + 6].tolist())
    with pytest.raises(ValueError, match="rank"):
        shard_for_rank(order, 3, 3)


def test_epoch_seeds_differ_by_worker_and_epoch_and_repeat_exactly() -> None:
    seeds = {epoch_seed(7, epoch, rank) for epoch in range(3) for rank in range(2)}
    assert len(seeds) == 6
    assert epoch_seed(7, 2, 1) == epoch_seed(7, 2, 1)
