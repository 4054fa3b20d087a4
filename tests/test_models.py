import json

import pytest
import torch
from torch import nn

from cifar_accel.errors import UserError
from cifar_accel.models import get_model, list_models


def _layers(model: nn.Module, kind: type) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, kind)]


@pytest.mark.parametrize(
    "name", ["simple_cnn", "bn_cnn", "resnet9", "resnet18", "resnet34", "airbench94", "airbench96"]
)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_every_model_maps_32x32_images_to_class_logits(name, num_classes):
    model = get_model(name, num_classes=num_classes).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, num_classes)


def test_registry_lists_the_foundation_models():
    assert {"simple_cnn", "bn_cnn", "resnet9", "resnet18", "resnet34", "airbench94", "airbench96"} <= set(list_models())


def test_unknown_model_names_the_valid_ones():
    with pytest.raises(UserError, match="unknown model 'resnet7'.*resnet18"):
        get_model("resnet7", num_classes=10)


def test_simple_cnn_is_seed_002s_network():
    model = get_model("simple_cnn", num_classes=10)
    convs = _layers(model, nn.Conv2d)
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 8), (8, 32), (32, 64), (64, 128), (128, 256)]
    assert convs[-1].padding == (0, 0)  # the valid conv that leaves 6x6
    linears = _layers(model, nn.Linear)
    expected = [(6 * 6 * 256, 256), (256, 128), (128, 64), (64, 10)]
    assert [(layer.in_features, layer.out_features) for layer in linears] == expected
    assert [d.p for d in _layers(model, nn.Dropout2d)] == [0.5]
    assert not _layers(model, nn.BatchNorm2d)


def test_bn_cnn_is_seed_004s_network():
    model = get_model("bn_cnn", num_classes=10)
    convs = _layers(model, nn.Conv2d)
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (3, 32),
        (32, 64),
        (64, 128),
        (128, 128),
        (128, 256),
        (256, 256),
    ]
    assert [b.num_features for b in _layers(model, nn.BatchNorm2d)] == [32, 128, 256]
    linears = _layers(model, nn.Linear)
    assert [(layer.in_features, layer.out_features) for layer in linears] == [(4096, 1024), (1024, 512), (512, 10)]
    assert [d.p for d in _layers(model, nn.Dropout2d)] == [0.05]
    assert [d.p for d in _layers(model, nn.Dropout) if type(d) is nn.Dropout] == [0.1, 0.1]


@pytest.mark.parametrize(
    ("name", "parameters"), [("resnet18", 11_173_962), ("resnet34", 21_282_122), ("resnet9", 6_573_120)]
)
def test_residual_networks_have_the_published_cifar_sizes(name, parameters):
    model = get_model(name, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert not _layers(model, nn.MaxPool2d) or name == "resnet9"  # CIFAR ResNets: no stem max-pool
    first_conv = _layers(model, nn.Conv2d)[0]
    assert first_conv.kernel_size == (3, 3) and first_conv.stride == (1, 1)


def test_constructor_arguments_round_trip_through_json():
    arguments = json.loads(json.dumps({"dropout": 0.25}))
    model = get_model("simple_cnn", num_classes=7, **arguments)
    assert [d.p for d in _layers(model, nn.Dropout2d)] == [0.25]


def test_airbench96_groups_add_a_residual_third_convolution():
    small = get_model("airbench94", num_classes=10)
    large = get_model("airbench96", num_classes=10)
    assert [g.conv1.out_channels for g in small.groups] == [64, 256, 256]
    assert [g.conv1.out_channels for g in large.groups] == [128, 512, 512]
    assert all(g.residual and hasattr(g, "conv3") for g in large.groups) and not small.groups[0].residual


@pytest.mark.parametrize("name", ["airbench94", "airbench96"])
def test_airbench_folded_for_inference_gives_the_same_logits_without_batchnorm(name):
    torch.manual_seed(0)
    model = get_model(name, num_classes=10, widths=[8, 16, 16]).to(memory_format=torch.channels_last)
    norms = _layers(model, nn.BatchNorm2d)
    for norm in norms:  # statistics and biases as training leaves them, not the identity they start as
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.bias.data.normal_()
    with torch.no_grad():  # a scale of -1 does not commute with the max-pool: that BatchNorm must stay
        model.groups[1].norm1.weight.fill_(-1.0)
    images = torch.randn(6, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    folded = model.eval().folded_for_inference()
    with torch.no_grad():
        assert torch.allclose(folded(images), model(images), atol=1e-5)
    assert len(_layers(folded, nn.BatchNorm2d)) == 1 and isinstance(folded.groups[1].norm1, nn.BatchNorm2d)
    assert all(norm.weight.requires_grad is False for norm in _layers(model, nn.BatchNorm2d))  # the original kept
    assert len(_layers(model, nn.BatchNorm2d)) == len(norms)
