import torch
from torch import nn

from cifar_accel.models import get_model
from cifar_accel.tricks import Lookahead, tta_logits


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
