"""MixUp and CutMix per batch: soft targets that match the pixels mixed, draws from (seed, epoch, batch, process)."""

import pytest
import torch
from torchvision.transforms import v2

from cifar_accel.augment import BatchMixing, TensorRandAugment, global_rng_seeded

CLASSES = 10


def batches(count: int, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(size, 3, 32, 32, generator=generator), torch.randint(0, CLASSES, (size,), generator=generator))
        for _ in range(count)
    ]


def mixed(mixing: BatchMixing, epoch: int = 0, first_batch: int = 0, count: int = 4) -> list:
    """The first ``count`` batches mixed, starting from ``first_batch`` as a resumed epoch does."""
    return list(mixing.batches(iter(batches(count)[first_batch:]), epoch, first_batch))


def test_mixup_blends_each_image_with_its_neighbour_by_the_share_its_target_gives_it():
    images, labels = batches(1)[0]
    ((mixed_images, targets),) = mixed(BatchMixing(0.4, 0.0, CLASSES, 0, 0), count=1)
    assert torch.allclose(targets.sum(dim=1), torch.ones(len(labels)))
    index = next(i for i in range(len(labels)) if labels[i] != labels[i - 1])  # its neighbour is another class
    share = targets[index, labels[index]].item()
    assert targets[index, labels[index - 1]].item() == pytest.approx(1 - share)
    assert torch.allclose(mixed_images, share * images + (1 - share) * images.roll(1, 0), atol=1e-6)


def test_cutmix_pastes_one_box_whose_area_is_the_neighbours_share():
    images, labels = batches(1)[0]
    ((mixed_images, targets),) = mixed(BatchMixing(0.0, 1.0, CLASSES, 0, 0), count=1)
    from_neighbour = (mixed_images != images).any(dim=1)[0]  # [H, W]: pixels taken from the previous image
    rows, columns = from_neighbour.any(dim=1).nonzero(), from_neighbour.any(dim=0).nonzero()
    box_area = int((rows.max() - rows.min() + 1) * (columns.max() - columns.min() + 1))
    assert int(from_neighbour.sum()) == box_area  # one rectangle
    index = next(i for i in range(len(labels)) if labels[i] != labels[i - 1])
    assert targets[index, labels[index - 1]].item() == pytest.approx(box_area / 32**2)


def test_a_batchs_mix_depends_on_seed_epoch_batch_and_process_only():
    reference = mixed(BatchMixing(0.4, 1.0, CLASSES, seed=3, process_index=0))
    torch.manual_seed(12345)  # the global generator's state does not matter ...
    again = mixed(BatchMixing(0.4, 1.0, CLASSES, seed=3, process_index=0))
    resumed = mixed(BatchMixing(0.4, 1.0, CLASSES, seed=3, process_index=0), first_batch=2)
    for (images, targets), (images_again, targets_again) in zip(reference, again, strict=True):
        assert torch.equal(images, images_again) and torch.equal(targets, targets_again)
    for (images, targets), (images_resumed, targets_resumed) in zip(reference[2:], resumed, strict=True):
        assert torch.equal(images, images_resumed) and torch.equal(targets, targets_resumed)
    for other in (
        mixed(BatchMixing(0.4, 1.0, CLASSES, seed=4, process_index=0)),
        mixed(BatchMixing(0.4, 1.0, CLASSES, seed=3, process_index=1)),
        mixed(BatchMixing(0.4, 1.0, CLASSES, seed=3, process_index=0), epoch=1),
    ):
        assert any(not torch.equal(a[1], b[1]) for a, b in zip(reference, other, strict=True))
    # ... and is left as it was: mixing draws from its own seeding only.
    state = torch.get_rng_state()
    mixed(BatchMixing(0.4, 1.0, CLASSES, seed=3, process_index=0))
    assert torch.equal(torch.get_rng_state(), state)


def test_with_both_each_batch_gets_mixup_or_cutmix():
    kinds = set()
    for _, targets in mixed(BatchMixing(0.4, 1.0, CLASSES, 0, 0), count=16):
        # CutMix's share is a whole number of pixels out of 1024; MixUp's a Beta draw.
        share = targets.max(dim=1).values.min().item()
        kinds.add("cutmix" if abs(share * 1024 - round(share * 1024)) < 1e-3 else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_channels_last_batches_stay_channels_last():
    images, labels = batches(1)[0]
    images = images.contiguous(memory_format=torch.channels_last)
    for alphas in ((0.4, 0.0), (0.0, 1.0)):
        ((mixed_images, _),) = BatchMixing(*alphas, CLASSES, 0, 0).batches(iter([(images, labels)]), 0, 0)
        assert mixed_images.is_contiguous(memory_format=torch.channels_last)


def test_our_randaugment_makes_v2s_images_from_the_same_draws():
    """TensorRandAugment is v2 RandAugment made cheaper: every op (translations by slicing included), both
    signs, on 300 images seeded as the loader seeds them, give v2's own images exactly."""
    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours, theirs = TensorRandAugment(), v2.RandAugment()
    for index, image in enumerate(images):
        with global_rng_seeded(index):
            expected = theirs(image)
        with global_rng_seeded(index):
            assert torch.equal(ours(image), expected), index
