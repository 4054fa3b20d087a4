import pytest
import torch

from cifar_accel.config import TrainConfig
from cifar_accel.optim import build_optimizer, build_scheduler


def _learning_rates(config: TrainConfig, total_steps: int = 100) -> list[float]:
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps)
    rates = []
    for _ in range(total_steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def test_onecycle_warms_up_linearly_to_the_peak_then_decays_to_zero():
    rates = _learning_rates(TrainConfig(scheduler="onecycle", learning_rate=0.4, warmup_fraction=0.2))
    assert rates[0] == pytest.approx(0.4 / 20)
    assert max(rates) == pytest.approx(0.4) and rates.index(max(rates)) == 19
    assert rates[-1] == pytest.approx(0.4 / 80, rel=0.01)
    decay = rates[19:]
    assert decay == sorted(decay, reverse=True)


def test_cosine_without_warm_up_starts_at_the_peak_and_halves_midway():
    rates = _learning_rates(TrainConfig(scheduler="cosine", learning_rate=1.0, warmup_fraction=0.0))
    assert rates[0] == pytest.approx(1.0)
    assert rates[50] == pytest.approx(0.5)


def test_multistep_multiplies_by_gamma_at_each_milestone():
    config = TrainConfig(
        scheduler="multistep", learning_rate=1.0, warmup_fraction=0.0, milestones=[0.5, 0.75], gamma=0.1
    )
    rates = _learning_rates(config)
    assert rates[49] == pytest.approx(1.0) and rates[50] == pytest.approx(0.1) and rates[75] == pytest.approx(0.01)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizers_take_the_configured_hyperparameters(name):
    optimizer = build_optimizer(
        torch.nn.Linear(2, 2), TrainConfig(optimizer=name, learning_rate=0.3, weight_decay=0.01)
    )
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.3 and group["weight_decay"] == 0.01
    assert isinstance(optimizer, torch.optim.SGD if name == "sgd" else torch.optim.AdamW)
