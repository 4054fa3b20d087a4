import pytest
import torch
from accelerate import Accelerator
from torch import nn

from cifar_accel import loop
from cifar_accel.loop import train_steps
from cifar_accel.models import get_model
from cifar_accel.tricks import Lookahead, ModelEma, tta_logits


class FirstColumn(nn.Module):
    """Logits that read the left-most pixel column: sensitive to flips and shifts."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, 0, :, 0]


def test_tta_levels_average_flips_and_one_pixel_shifts():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    model = FirstColumn()
    assert torch.equal(tta_logits(model, images, 0), images[:, 0, :, 0])
    mirrored = 0.5 * (images[:, 0, :, 0] + images[:, 0, :, -1])
    assert torch.allclose(tta_logits(model, images, 1), mirrored)
    level2 = tta_logits(model, images, 2)
    assert level2.shape == (2, 4) and not torch.allclose(level2, mirrored)


def lookahead_over_steps(total_steps: int) -> tuple[nn.Linear, Lookahead]:
    """A one-weight layer whose optimizer 'step' k sets the weight to k, with lookahead every 5 steps."""
    layer = nn.Linear(1, 1, bias=False)
    lookahead = Lookahead(layer, total_steps=total_steps, every=5)
    for step in range(total_steps):
        with torch.no_grad():
            layer.weight.fill_(float(step + 1))
        lookahead.step()
    return layer, lookahead


def test_lookahead_keeps_an_average_that_the_weights_end_on():
    layer, lookahead = lookahead_over_steps(10)
    # pulls at steps 5 (starts the average at 5) and 10 (decay 0.95^5): 0.774 * 5 + 0.226 * 10
    expected = 0.95**5 * 5 + (1 - 0.95**5) * 10
    assert torch.allclose(layer.weight, torch.tensor([[expected]]))
    lookahead.finish()  # nothing new since the last pull
    assert torch.allclose(layer.weight, torch.tensor([[expected]]))


def test_lookahead_ends_on_the_average_of_its_last_pull_as_airbench_does():
    layer, lookahead = lookahead_over_steps(7)
    assert layer.weight.item() == 7.0  # steps 6 and 7 moved the weights after the pull at step 5
    lookahead.finish()  # decay 1.0: the weights become the average, which the pull at step 5 set to 5
    assert layer.weight.item() == 5.0
    restored = Lookahead(layer, total_steps=7, every=5)
    restored.load_state_dict(lookahead.state_dict())
    assert restored.steps == 7 and restored.average[0].item() == 5.0


def test_airbench_whitening_decorrelates_patches_of_its_training_images():
    torch.manual_seed(0)
    images = torch.randn(64, 3, 32, 32)
    images[:, 1] += images[:, 0]  # correlated channels
    model = get_model("airbench94", num_classes=10)
    model.initialize_whitening(images)
    features = model.whiten(images)[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = features.T @ features / len(features)
    assert torch.allclose(covariance, torch.eye(12), atol=0.1)
    assert not model.whiten.weight.requires_grad


def test_model_ema_warms_up_then_averages_with_its_decay():
    layer = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.0)
    ema = ModelEma(layer, decay=0.5)
    expected = 0.0
    for update in range(1, 6):
        with torch.no_grad():
            layer.weight.fill_(float(update))
        ema.step()
        decay = min(0.5, (1 + update) / (10 + update))  # 2/11, 3/12, 4/13: warm-up; then 0.5
        expected = decay * expected + (1 - decay) * update
    assert ema.average[0].item() == pytest.approx(expected)
    assert layer.weight.item() == 5.0  # the model keeps its own weights


def test_model_ema_swaps_in_for_evaluation_and_back_and_averages_batchnorm_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = ModelEma(model, decay=0.9)
    model.train()
    model(torch.randn(8, 3, 6, 6))  # moves the running statistics and counts a batch
    ema.step()
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with ema.swapped_in():
        inside = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert all(torch.equal(weights[name], tensor) for name, tensor in model.state_dict().items())
    assert not torch.equal(inside["1.running_mean"], weights["1.running_mean"])  # averaged, not the batch's
    assert torch.equal(inside["1.num_batches_tracked"], weights["1.num_batches_tracked"])  # an integer: not averaged
    restored = ModelEma(model, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 1 and all(map(torch.equal, restored.average, ema.average))
    ema.finish()
    assert all(torch.equal(inside[name], tensor) for name, tensor in model.state_dict().items())


def test_max_grad_norm_clips_the_update():
    accelerator = Accelerator(cpu=True)
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    batches = [(torch.full((2, 4), 100.0), torch.full((2, 1), -100.0))]
    totals = torch.zeros(3, dtype=torch.float64)
    steps = train_steps(layer, batches, [optimizer], [], nn.MSELoss(), accelerator, totals, max_grad_norm=0.5)
    list(steps)
    assert layer.weight.norm().item() == pytest.approx(0.5)  # the gradient's norm is 10^5 before clipping


def test_a_run_that_will_take_hours_on_the_cpu_says_so_once_after_its_first_steps(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
    forecast = loop.RunLengthForecast(total_steps=1005, first_step=0, device=torch.device("cpu"))
    assert [forecast.note(step) for step in range(1, 5)] == [None] * 4
    now[0] = 50.0  # 5 steps in 50 s: 10 s a step
    line = forecast.note(5)
    assert line.startswith("note: at 10.0 s a step, the 1000 steps left take about 3 hours on this CPU")
    assert "python train.py --recipe airbench94" in line and forecast.note(6) is None
    now[0] = 0.0
    quick = loop.RunLengthForecast(total_steps=100, first_step=0, device=torch.device("cpu"))
    now[0] = 50.0
    assert quick.note(5) is None  # 95 steps of 10 s: under the hours that call for a note
    assert loop.RunLengthForecast(10**6, 0, torch.device("meta")).note(5) is None  # not a CPU: no note
