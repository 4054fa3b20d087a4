import dataclasses

import pytest
import torch

from cifar_accel.config import TrainConfig
from cifar_accel.errors import UserError
from cifar_accel.optim import build_optimizers, build_scheduler, epochs_for_updates, total_updates


def _learning_rates(config: TrainConfig, total_steps: int = 100) -> list[float]:
    model = torch.nn.Linear(2, 2)
    (optimizer,) = build_optimizers(model, config)
    scheduler = build_scheduler(optimizer, dataclasses.replace(config, epochs=1), steps_per_epoch=total_steps)
    rates = []
    for _ in range(total_steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def test_linear_warms_up_linearly_to_the_peak_then_decays_to_zero():
    rates = _learning_rates(TrainConfig(scheduler="linear", learning_rate=0.4, warmup_fraction=0.2))
    assert rates[0] == pytest.approx(0.4 / 20)
    assert max(rates) == pytest.approx(0.4) and rates.index(max(rates)) == 19
    assert rates[-1] == pytest.approx(0.4 / 80, rel=0.01)
    decay = rates[19:]
    assert decay == sorted(decay, reverse=True)


def test_num_warmup_steps_counts_the_warm_up_in_updates_over_the_fraction():
    rates = _learning_rates(TrainConfig(scheduler="linear", learning_rate=0.4, warmup_fraction=0.2, num_warmup_steps=5))
    assert rates[:5] == pytest.approx([0.08, 0.16, 0.24, 0.32, 0.4]) and max(rates) == rates[4]


@pytest.mark.parametrize("warmup", [100, 10])
def test_a_warm_up_that_would_not_end_before_the_run_does_is_refused_with_the_runs_updates(warmup):
    """10 updates: warm-up over 100 used to be cut to 10, and over all 10 of them, the decay never started."""
    config = TrainConfig(scheduler="linear", epochs=2, num_warmup_steps=warmup)
    (optimizer,) = build_optimizers(torch.nn.Linear(2, 2), config)
    message = (
        f"^--num_warmup_steps {warmup} must be fewer than the 10 optimizer updates this run makes \\(2 epochs of 5\\)"
        ", or warm-up never ends: give at most 9, or use --warmup_fraction$"
    )
    with pytest.raises(UserError, match=message):
        build_scheduler(optimizer, config, steps_per_epoch=5)
    build_scheduler(optimizer, dataclasses.replace(config, num_warmup_steps=9), steps_per_epoch=5)


def test_num_warmup_steps_counts_updates_whatever_the_number_of_processes():
    """The prepared scheduler steps once per process at each update: 2 processes warm up over twice the steps."""
    config = TrainConfig(scheduler="constant", learning_rate=1.0, epochs=2, num_warmup_steps=4)
    (optimizer,) = build_optimizers(torch.nn.Linear(2, 2), config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=3, num_processes=2)
    rates = []
    for _ in range(6):  # updates
        rates.append(scheduler.get_last_lr()[0])
        for _ in range(2):  # as Accelerate's prepared scheduler steps it
            optimizer.step()
            scheduler.step()
    assert rates[3] < 1.0 and rates[4] == rates[5] == 1.0, rates


@pytest.mark.parametrize(("updates", "per_epoch"), [(10, 3), (100, 10), (7, 48), (476, 48), (1, 5)])
def test_max_train_steps_becomes_epochs_of_exactly_that_many_updates(updates, per_epoch):
    epochs = epochs_for_updates(updates, per_epoch)
    assert total_updates(TrainConfig(epochs=epochs), per_epoch) == updates


def test_cosine_without_warm_up_starts_at_the_peak_and_halves_midway():
    rates = _learning_rates(TrainConfig(scheduler="cosine", learning_rate=1.0, warmup_fraction=0.0))
    assert rates[0] == pytest.approx(1.0)
    assert rates[50] == pytest.approx(0.5)


def test_cosine_can_end_at_a_floor_instead_of_zero():
    config = TrainConfig(scheduler="cosine", learning_rate=0.025, warmup_fraction=0.0, final_lr_fraction=0.04)
    rates = _learning_rates(config, total_steps=101)
    assert rates[0] == pytest.approx(0.025) and rates[-1] == pytest.approx(0.001, rel=0.01)


def test_multistep_multiplies_by_gamma_at_each_milestone():
    config = TrainConfig(
        scheduler="multistep", learning_rate=1.0, warmup_fraction=0.0, milestones=[0.5, 0.75], gamma=0.1
    )
    rates = _learning_rates(config)
    assert rates[49] == pytest.approx(1.0) and rates[50] == pytest.approx(0.1) and rates[75] == pytest.approx(0.01)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizers_take_the_configured_hyperparameters(name):
    (optimizer,) = build_optimizers(
        torch.nn.Linear(2, 2), TrainConfig(optimizer=name, learning_rate=0.3, weight_decay=0.01)
    )
    group = optimizer.param_groups[0]  # a Linear layer: every parameter is in the plain group
    assert group["lr"] == 0.3 and group["weight_decay"] == 0.01
    assert isinstance(optimizer, torch.optim.SGD if name == "sgd" else torch.optim.AdamW)


def test_airbench_groups_speed_up_batchnorm_biases_and_freeze_the_whitening_bias():
    from cifar_accel.models import get_model

    model = get_model("airbench94", num_classes=10)
    config = TrainConfig(learning_rate=2.0, weight_decay=0.01, bias_lr_scale=64, whiten_bias_epochs=1, epochs=3)
    (optimizer,) = build_optimizers(model, config)
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert groups["norm_bias"]["lr"] == 128.0 and groups["norm_bias"]["weight_decay"] == 0.01 / 64
    assert [p.shape for p in groups["whitening_bias"]["params"]] == [torch.Size([24])]
    frozen = {id(model.whiten.weight)} | {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert not frozen & {id(p) for group in optimizer.param_groups for p in group["params"]}
    scheduler = build_scheduler(optimizer, dataclasses.replace(config, warmup_fraction=0), steps_per_epoch=10)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert rates["whitening_bias"] == 0.0 and rates["other"] > 0 and rates["norm_bias"] == 64 * rates["other"]


def test_the_airbench94_recipe_runs_airbench_triangle_over_476_steps():
    """9.9 epochs of 48 full batches of 1024 (50,000 images, last batch dropped): 476 steps, from 0.2 of the peak
    up to the peak at 23% (step 109), down to 0.07 of it at the end, as airbench94 schedules them."""
    from cifar_accel.optim import lr_multiplier, total_updates
    from cifar_accel.settings import parse_train_args

    config = parse_train_args(["--recipe", "airbench94"])
    steps = total_updates(config, 50_000 // config.batch_size)
    multiplier = lr_multiplier(config, steps)
    assert (config.epochs, config.drop_last, steps) == (9.9, True, 476)
    assert multiplier(0) == pytest.approx(0.2) and multiplier(109) == pytest.approx(1.0)
    assert multiplier(54) == pytest.approx(0.2 + 0.8 * 54 / 109)
    assert multiplier(476) == pytest.approx(0.07) and multiplier(300) == pytest.approx(0.07 + 0.93 * 176 / 367)


def test_the_schedule_spans_every_process_step_of_the_prepared_scheduler():
    """Accelerate steps a prepared scheduler once per process at each update: 2 processes with 3 updates
    per epoch each, 2 epochs, make 12 scheduler steps, and the decay ends on the last of them."""
    config = TrainConfig(scheduler="onecycle", learning_rate=1.0, warmup_fraction=0.0, epochs=2)
    (optimizer,) = build_optimizers(torch.nn.Linear(2, 2), config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=3, num_processes=2)
    for _ in range(11):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(1 / 12)


def _airbench_muon_step(weight: torch.Tensor, grad: torch.Tensor, buffer: torch.Tensor, lr: float, momentum: float):
    """airbench94_muon's filter update, restated from its description: momentum buffer b = m b + g, Nesterov
    g + m b, the filter rescaled to norm sqrt(out), then minus lr x the 3-step quintic Newton-Schulz
    orthogonalisation (in bfloat16) of the update as an [out, in*h*w] matrix."""
    buffer.mul_(momentum).add_(grad)
    update = (grad + momentum * buffer).reshape(len(grad), -1)
    matrix = update.bfloat16() / (update.norm() + 1e-7)
    transposed = matrix.shape[0] > matrix.shape[1]
    matrix = matrix.T if transposed else matrix
    for _ in range(3):
        gram = matrix @ matrix.T
        matrix = 3.4445 * matrix + (-4.7750 * gram + 2.0315 * gram @ gram) @ matrix
    matrix = matrix.T if transposed else matrix
    weight.mul_(len(weight) ** 0.5 / weight.norm())
    weight.sub_(lr * matrix.float().view(weight.shape))


@pytest.mark.parametrize("channels_last", [False, True])
def test_muon_steps_the_filters_as_airbench94_muon_and_sgd_the_rest(channels_last):
    from cifar_accel.optim import FilterMuon

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=True), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.randn(1, 3, 6, 6))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    config = TrainConfig(optimizer="muon", muon_learning_rate=0.24, muon_momentum=0.6, learning_rate=0.1)
    sgd, muon = build_optimizers(model, config)
    assert isinstance(sgd, torch.optim.SGD) and isinstance(muon, FilterMuon)
    filters = model[0].weight
    assert {id(p) for group in sgd.param_groups for p in group["params"]} == {
        id(model[0].bias),
        id(model[2].weight),
        id(model[2].bias),
    }
    layout = torch.channels_last if channels_last else torch.contiguous_format
    start = filters.detach().clone()
    expected, buffer = start.clone(), torch.zeros_like(filters)
    for _ in range(3):  # the second and third steps use the momentum buffer
        grad = torch.randn_like(filters)
        filters.grad = grad.clone().contiguous(memory_format=layout)
        muon.step()
        muon.zero_grad()
        assert filters.grad is None
        _airbench_muon_step(expected, grad, buffer, lr=0.24, momentum=0.6)
    # Both orthogonalise in bfloat16, in a different order of operations: ~2% apart (without Nesterov, 18%).
    change, expected_change = filters.detach() - start, expected - start
    assert (change - expected_change).norm() / expected_change.norm() < 0.05
    assert filters.is_contiguous(memory_format=layout)


def test_the_airbench94_muon_recipe_restates_its_learning_rates_for_a_mean_reduced_loss():
    """airbench94_muon sums the loss of 2000 examples: its SGD learning rates x 2000 here, its decay / 2000,
    Muon's rate unchanged; 200 steps straight down to zero; the whitening bias down to zero over 75 steps."""
    from cifar_accel.models import get_model
    from cifar_accel.optim import total_updates
    from cifar_accel.settings import parse_train_args

    config = parse_train_args(["--recipe", "airbench94_muon"])
    sgd, muon = build_optimizers(get_model(config.model, num_classes=10), config)
    rates = {group["name"]: (group["lr"], group["lr"] * group["weight_decay"]) for group in sgd.param_groups}
    assert rates["other"] == pytest.approx((0.67 * 2000, 0.004), rel=1e-4)
    assert rates["norm_bias"] == rates["whitening_bias"] == pytest.approx((0.053 * 2000, 0.004), rel=1e-4)
    assert muon.param_groups[0]["lr"] == 0.24 and len(muon.param_groups[0]["params"]) == 6
    steps_per_epoch = 50_000 // config.batch_size
    assert total_updates(config, steps_per_epoch) == 200
    scheduler = build_scheduler(sgd, config, steps_per_epoch)
    multipliers = {name: [] for name in rates}
    for _ in range(200):
        for group in sgd.param_groups:
            multipliers[group["name"]].append(group["lr"] / rates[group["name"]][0])
        sgd.step()
        scheduler.step()
    assert multipliers["other"][100] == pytest.approx(0.5) and multipliers["other"][199] == pytest.approx(1 / 200)
    assert multipliers["whitening_bias"][25] == pytest.approx(1 - 25 / 75)
    assert multipliers["whitening_bias"][75:] == [0.0] * 125
