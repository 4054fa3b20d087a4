"""make_dataloader: normalised batches, reproducible augmentation, and the --auto_augment and
--random_erasing policies (torch loader, training images only)."""

import pytest
import torch

from cifar_accel.augment import DecodedImages
from cifar_accel.config import AUTO_AUGMENT, TrainConfig
from cifar_accel.data.decode_cache import decode_split
from cifar_accel.data.loaders import make_dataloader
from cifar_accel.data.loading import load_data
from cifar_accel.device_data import DeviceImageDataset
from cifar_accel.errors import UserError


def test_loader_yields_normalised_augmented_batches(colour_dataset):
    data = load_data(TrainConfig(dataset=str(colour_dataset)))
    train_loader = make_dataloader(data.train, data, train=True, batch_size=64, num_workers=0, cutout=8)
    eval_loader = make_dataloader(data.train, data, train=False, batch_size=64, num_workers=0)
    images, labels = next(iter(train_loader))
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert abs(float(images.mean())) < 0.5
    clean = torch.cat([batch for batch, _ in eval_loader])
    # Evaluation is deterministic; training augments (crop, flip, cutout) so images differ from the clean ones.
    assert torch.equal(clean, torch.cat([batch for batch, _ in eval_loader]))
    assert abs(float(clean.mean())) < 0.2 and abs(float(clean.std()) - 1) < 0.2
    shuffled_again = torch.cat([batch for batch, _ in train_loader])
    assert not torch.equal(shuffled_again.sort(dim=0).values, clean.sort(dim=0).values)


def test_loader_augmentation_is_reproducible_for_a_seed(colour_dataset):
    data = load_data(TrainConfig(dataset=str(colour_dataset)))

    def first_batch(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        loader = make_dataloader(data.train, data, train=True, batch_size=32, num_workers=2, seed=seed)
        return next(iter(loader))[0]

    assert torch.equal(first_batch(1), first_batch(1))
    assert not torch.equal(first_batch(1), first_batch(2))


# --auto_augment and --random_erasing (torch loader, training images only)


@pytest.fixture(scope="module")
def colour_data(colour_dataset):
    return load_data(TrainConfig(dataset=str(colour_dataset)))


@pytest.fixture
def one_thread():
    """Run as DataLoader workers do. A second intra-op thread only adds hand-offs on 32x32 images, and on a
    busy machine each can wait milliseconds: with two, these tests took 15 s instead of 1 s beside a training job."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def training_split(data, epoch: int = 1, **options) -> DecodedImages:
    """The training dataset a loader with these options fetches from, at ``epoch``."""
    split = make_dataloader(data.train, data, train=True, batch_size=16, num_workers=0, **options).dataset
    split.set_epoch(epoch)
    return split


def fetch(split, indices) -> torch.Tensor:
    return torch.stack([split[index][0] for index in indices])


def mirror_symmetric_copies(count: int) -> torch.Tensor:
    """``count`` identical images that a left-right flip leaves unchanged: without crops, two examples
    then differ only by what the policy drew for them."""
    rows = torch.arange(0, 256, 8, dtype=torch.uint8)[:, None].expand(32, 32)
    image = torch.stack([rows, rows.flip(0), torch.full_like(rows, 90)])
    return image.expand(count, 3, 32, 32).contiguous()


@pytest.mark.usefixtures("one_thread")
def test_a_policys_images_depend_on_seed_epoch_and_index_only(colour_data):
    options = {"seed": 3, "auto_augment": "randaugment", "random_erasing": 0.5}
    indices = list(range(0, 256, 8))
    split = training_split(colour_data, **options)
    torch.manual_seed(0)
    in_order = fetch(split, indices)
    torch.manual_seed(12345)  # another global state, and the examples fetched backwards by a fresh copy
    backwards = fetch(training_split(colour_data, **options), indices[::-1]).flip(0)
    assert torch.equal(in_order, backwards)
    assert torch.equal(fetch(split, indices), in_order)  # a retry by the same worker
    assert in_order.dtype == torch.uint8 and in_order.shape == (len(indices), 3, 32, 32)


@pytest.mark.usefixtures("one_thread")
def test_a_policy_draws_afresh_for_every_seed_epoch_and_index():
    images = mirror_symmetric_copies(16)
    labels = torch.arange(16)

    def policy_images(seed: int, epoch: int) -> torch.Tensor:
        # No crop, and alternating flips repeat every two epochs: only the policy tells epochs 0 and 2 apart.
        split = DecodedImages(
            images, labels, True, crop_padding=0, alternating_flip=True, seed=seed, auto_augment="randaugment"
        )
        split.set_epoch(epoch)
        return fetch(split, range(16))

    first = policy_images(seed=0, epoch=0)
    assert len({image.numpy().tobytes() for image in first}) >= 12  # identical inputs, 16 examples
    assert torch.equal(first, policy_images(seed=0, epoch=0))
    assert not torch.equal(first, policy_images(seed=0, epoch=2))
    assert not torch.equal(first, policy_images(seed=1, epoch=0))


def test_worker_processes_make_the_main_processs_images(colour_data):
    subset = colour_data.train.select(range(64))

    def epoch_batches(num_workers: int) -> list[torch.Tensor]:
        loader = make_dataloader(
            subset, colour_data, True, 16, num_workers, seed=5, auto_augment="cifar10", random_erasing=0.5
        )
        loader.dataset.set_epoch(1)
        return [images for images, _ in loader]

    # Each worker makes every other batch, with one thread; the main process here keeps all of its threads.
    in_workers = epoch_batches(num_workers=2)
    assert len(in_workers) == 4
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(epoch_batches(0), in_workers, strict=True))


@pytest.mark.usefixtures("one_thread")
def test_fetching_leaves_the_global_random_state_as_it_was(colour_data):
    subset = colour_data.train.select(range(32))
    loader = make_dataloader(subset, colour_data, True, 8, num_workers=0, auto_augment="augmix", random_erasing=1.0)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    for _ in loader:
        pass
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("policy", AUTO_AUGMENT)
def test_every_policy_changes_images_and_keeps_them_uint8(colour_data, policy):
    plain = fetch(training_split(colour_data), range(64))
    augmented = fetch(training_split(colour_data, auto_augment=policy), range(64))
    assert augmented.dtype == torch.uint8 and augmented.shape == plain.shape
    changed = sum(not torch.equal(before, after) for before, after in zip(plain, augmented, strict=True))
    assert changed >= 32  # AutoAugment's sub-policies apply each operation with a probability


def test_an_unknown_policy_is_refused(colour_data):
    with pytest.raises(UserError, match="--auto_augment 'imagenet' is not one of cifar10, randaugment"):
        training_split(colour_data, auto_augment="imagenet")


def crop_and_flip_only(data, seed: int, epoch: int) -> torch.Tensor:
    """The training images as the device loader, an independent implementation, crops and flips them."""
    images, labels = decode_split(data.train, data.image_column, data.label_column)
    device = DeviceImageDataset(images, labels, [0.0] * 3, [1.0] * 3, True, seed=seed)
    device.set_epoch(epoch)
    return (device.__getitems__(list(range(len(labels))))[0] * 255).round().to(torch.uint8)


@pytest.mark.usefixtures("one_thread")
def test_random_erasing_fills_one_rectangle_per_image_with_the_mean_colour(colour_data):
    expected = crop_and_flip_only(colour_data, seed=2, epoch=1)
    assert torch.equal(fetch(training_split(colour_data, seed=2, random_erasing=0.0), range(256)), expected)
    split = training_split(colour_data, seed=2, random_erasing=1.0)
    erased = fetch(split, range(256))
    fill = torch.tensor([round(255 * value) for value in colour_data.mean], dtype=torch.uint8)[:, None, None]
    for image, original in zip(erased, expected, strict=True):
        rows, columns = (image != original).any(dim=0).nonzero(as_tuple=True)
        assert len(rows) >= 16  # at least 2% of the area
        box = image[:, rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
        assert (box == fill).all()  # one solid rectangle holds every changed pixel
    split.set_epoch(2)  # the next epoch erases afresh: the stored images were left as they were
    assert torch.equal(
        fetch(split, range(256)), fetch(training_split(colour_data, 2, seed=2, random_erasing=1.0), range(256))
    )


@pytest.mark.usefixtures("one_thread")
def test_the_policy_runs_before_cutout(colour_data):
    plain, cut = (fetch(training_split(colour_data, cutout=cutout), range(64)) for cutout in (0, 8))
    square = (cut == 0).all(dim=1) & (plain != 0).any(dim=1)
    assert square.sum(dim=(1, 2)).min() >= 16  # every image has its square, clipped at the border to 4x4 or more
    augmented = fetch(training_split(colour_data, cutout=8, auto_augment="randaugment"), range(64))
    assert (augmented.permute(1, 0, 2, 3)[:, square] == 0).all()  # a geometric or colour op after would move it


@pytest.mark.usefixtures("one_thread")
def test_random_erasing_is_applied_with_its_probability_and_normalises_to_about_zero(colour_data):
    half = fetch(training_split(colour_data, random_erasing=0.5), range(128))
    untouched = crop_and_flip_only(colour_data, seed=0, epoch=1)[:128]
    erased = sum(not torch.equal(image, original) for image, original in zip(half, untouched, strict=True))
    assert 34 <= erased <= 94  # about 64
    loader = make_dataloader(colour_data.train, colour_data, True, 256, num_workers=0, random_erasing=1.0)
    loader.dataset.set_epoch(1)
    batch, _ = next(iter(loader))
    plain_loader = make_dataloader(colour_data.train, colour_data, True, 256, num_workers=0)
    plain_loader.dataset.set_epoch(1)
    plain, _ = next(iter(plain_loader))
    assert batch[batch != plain].abs().max() < 0.05  # the mean colour, normalised


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("policy", AUTO_AUGMENT)
def test_evaluation_images_are_never_augmented(colour_data, policy):
    def evaluation_batches(**options) -> torch.Tensor:
        loader = make_dataloader(colour_data.evaluation, colour_data, False, 32, num_workers=0, **options)
        loader.dataset.set_epoch(3)  # as if a training loop had set it
        return torch.cat([images for images, _ in loader])

    assert torch.equal(evaluation_batches(auto_augment=policy, random_erasing=1.0), evaluation_batches())
