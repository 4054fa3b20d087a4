"""Augmentation: the epoch's crops, flips and cutout drawn from (seed, epoch); the torchvision v2
policies and random erasing per image, seeded per example; MixUp and CutMix per batch.

Every random draw is a function of the seed, the epoch and the example (or batch), never of a
worker's or process's generator, so a resumed run augments exactly as an uninterrupted one.
"""

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from cifar_accel.config import AUTO_AUGMENT
from cifar_accel.errors import UserError


def reflect_pad(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Reflect-pad the last two dimensions with slice copies (uint8 on every device, no float copy)."""
    height, width = images.shape[-2:]
    out = images.new_empty(*images.shape[:-2], height + 2 * padding, width + 2 * padding)
    out[..., padding:-padding, padding:-padding] = images
    out[..., :padding, padding:-padding] = images[..., 1 : padding + 1, :].flip(-2)
    out[..., -padding:, padding:-padding] = images[..., -padding - 1 : -1, :].flip(-2)
    # The columns are mirrored from the row-padded result, which fills the corners too.
    out[..., :padding] = out[..., padding + 1 : 2 * padding + 1].flip(-1)
    out[..., -padding:] = out[..., -2 * padding - 1 : -padding - 1].flip(-1)
    return out


def cutout(images: torch.Tensor, centres: torch.Tensor, size: int) -> torch.Tensor:
    """Zero a ``size``x``size`` square around each image's (row, column) centre, clipped at the border.

    ``images`` is [N, C, H, W] and ``centres`` [N, 2]; both loaders erase with this one function.
    """
    top_left = centres - size // 2
    rows = torch.arange(images.shape[-2], device=images.device)
    columns = torch.arange(images.shape[-1], device=images.device)
    in_rows = (rows >= top_left[:, :1]) & (rows < top_left[:, :1] + size)
    in_columns = (columns >= top_left[:, 1:]) & (columns < top_left[:, 1:] + size)
    return images.masked_fill((in_rows[:, :, None] & in_columns[:, None, :])[:, None], 0)


@dataclass
class AugmentationDraws:
    """Every training example's random choices for one epoch."""

    offsets: torch.Tensor  # [N, 2] row and column of the image-sized crop inside the padded image
    flips: torch.Tensor  # [N] bool: mirror left-right
    cutout_centres: torch.Tensor  # [N, 2] row and column of the erased square's centre

    def to(self, device: torch.device) -> "AugmentationDraws":
        return AugmentationDraws(self.offsets.to(device), self.flips.to(device), self.cutout_centres.to(device))


def draw_augmentation(
    count: int, padding: int, seed: int, epoch: int, alternating_flip: bool, side: int = 32
) -> AugmentationDraws:
    """One epoch's crops, flips and cutout centres, drawn from ``(seed, epoch)`` alone.

    Nothing depends on which process, worker, batch or attempt fetches an example, so a run
    resumed mid-epoch sees exactly the images an uninterrupted run would have seen.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    offsets = torch.randint(0, 2 * padding + 1, (count, 2), generator=generator)
    flips = torch.rand(count, generator=generator) < 0.5
    if alternating_flip:
        # A random half is flipped in even epochs and the other half in odd ones, so over two
        # epochs every image is seen both ways (airbench's "alternating flip").
        first_half = torch.rand(count, generator=torch.Generator().manual_seed(seed)) < 0.5
        flips = first_half if epoch % 2 == 0 else ~first_half
    cutout_centres = torch.randint(0, side, (count, 2), generator=generator)
    return AugmentationDraws(offsets, flips, cutout_centres)


class AugmentedSplit(torch.utils.data.Dataset):
    """A decoded split, reflect-padded once when training, with the current epoch's draws.

    ``set_epoch`` must be called before each training epoch (the training loop does); both
    loaders' datasets build on this class, so the same seed gives them the same augmentation.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        train: bool,
        crop_padding: int = 4,
        cutout: int = 0,
        alternating_flip: bool = False,
        seed: int = 0,
    ):
        self.train, self.cutout, self.alternating_flip, self.seed = train, cutout, alternating_flip, seed
        self.padding = crop_padding if train else 0
        self.side = images.shape[-1]
        self.images = reflect_pad(images, self.padding) if self.padding else images
        self.labels = labels
        self.set_epoch(0)

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # with the seed and an example's index, it seeds that example's policy draws
        if self.train:
            draws = draw_augmentation(
                len(self.labels), self.padding, self.seed, epoch, self.alternating_flip, self.side
            )
            self.draws = draws.to(self.labels.device)


def shifted(image: torch.Tensor, shift: int, dim: int) -> torch.Tensor:
    """``image`` moved ``shift`` pixels along ``dim`` (toward higher indices when positive), zeros coming in."""
    out = torch.zeros_like(image)
    size = image.shape[dim]
    if abs(shift) < size:
        kept = size - abs(shift)
        out.narrow(dim, max(shift, 0), kept).copy_(image.narrow(dim, max(-shift, 0), kept))
    return out


class TensorRandAugment(v2.RandAugment):
    """v2 ``RandAugment`` for one uint8 [C, H, W] tensor: the same draws from the global generator and the same
    images (tested against v2's own), in less time per image. v2's ``forward`` searches its input for images
    and makes each op's magnitude table afresh; here the input is known and the tables are made once per image
    size. A translation (a whole number of pixels, nearest interpolation, filled with 0) is a slice copy rather
    than an affine grid sample, about a tenth of the time on a 32x32 image."""

    def __init__(self):
        super().__init__()  # num_ops 2, magnitude 9 of 31 bins, nearest interpolation, fill 0: v2's defaults
        self.names = tuple(self._AUGMENTATION_SPACE)
        self.tables: dict[tuple[int, int], dict[str, float | None]] = {}

    def _magnitudes(self, height: int, width: int) -> dict[str, float | None]:
        if (height, width) not in self.tables:
            bins = {
                name: make(self.num_magnitude_bins, height, width)
                for name, (make, _) in self._AUGMENTATION_SPACE.items()
            }
            self.tables[height, width] = {
                name: None if magnitudes is None else float(magnitudes[self.magnitude])
                for name, magnitudes in bins.items()
            }
        return self.tables[height, width]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        table = self._magnitudes(*image.shape[-2:])
        for _ in range(self.num_ops):
            name = self.names[int(torch.randint(len(self.names), ()))]  # as v2 draws: the op, then maybe the sign
            magnitude = table[name]
            if magnitude is None:
                magnitude = 0.0
            elif self._AUGMENTATION_SPACE[name][1] and torch.rand(()) <= 0.5:
                magnitude = -magnitude
            if name in ("TranslateX", "TranslateY"):
                image = shifted(image, int(magnitude), dim=-1 if name == "TranslateX" else -2)
            else:
                image = self._apply_image_or_video_transform(
                    image, name, magnitude, interpolation=self.interpolation, fill=self._fill
                )
        return image


# The policies of ``--auto_augment``, each built afresh for a loader.
AUTO_AUGMENT_POLICIES: dict[str, Callable[[], v2.Transform]] = {
    "cifar10": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10),
    "randaugment": TensorRandAugment,
    "trivialaugment": v2.TrivialAugmentWide,
    "augmix": v2.AugMix,
}


def auto_augment_policy(name: str | None) -> v2.Transform | None:
    """The ``transforms.v2`` policy called ``name`` (one of ``config.AUTO_AUGMENT``), or None for none."""
    if name is None:
        return None
    if name not in AUTO_AUGMENT_POLICIES:
        raise UserError(f"--auto_augment {name!r} is not one of {', '.join(AUTO_AUGMENT)}")
    return AUTO_AUGMENT_POLICIES[name]()


def draw_seed(*numbers: int) -> int:
    """A 32-bit seed from these numbers alone: (seed, epoch, example) for an image's random transforms,
    (seed, epoch, batch, process) for a batch's mixing.

    Hashed rather than combined arithmetically: torch's CPU generator keeps only the low 32 bits of a
    seed, so every number must reach those bits (``seed << 32 | index`` would drop the seed).
    """
    key = ",".join(str(number) for number in numbers).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little")


@contextlib.contextmanager
def global_rng_seeded(seed: int) -> Iterator[None]:
    """Seed torch's global CPU generator for the block, then give it back its state.

    The v2 policies and RandomErasing draw from that generator and take no other. Only the CPU
    generator is touched: ``torch.manual_seed`` (and so ``fork_rng`` + ``manual_seed``) also queues
    lazy seeding of the CUDA-like devices, recording a stack trace each time: ~0.2 ms a call on a
    2-core CPU, over half a policy's time on a 32x32 image, against ~5 us for this whole block.
    Restoring matters with ``num_workers=0``, where the images are made in the training process.
    """
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


class DecodedImages(AugmentedSplit):
    """Per-image torchvision ``transforms.v2`` crop, flip, policy, cutout and random erasing, run in
    DataLoader workers.

    Crop, flip and cutout come from the epoch's draws; the policy and random erasing draw from the
    global generator, seeded per example by ``draw_seed``, so an example's image depends only on
    (seed, epoch, index), not on the worker, process, batch or attempt that fetches it.
    ``erase_value`` is the uint8 colour random erasing fills with (see ``make_dataloader``).
    """

    def __init__(
        self,
        *split_and_draws,  # AugmentedSplit's: images, labels, train, crop_padding, cutout, alternating_flip, seed
        auto_augment: str | None = None,
        random_erasing: float = 0.0,
        erase_value: Sequence[int] = (0, 0, 0),
        **draws,
    ):
        super().__init__(*split_and_draws, **draws)
        self.policy = auto_augment_policy(auto_augment) if self.train else None
        # inplace=False: after an identity policy the image is still a view of the stored split.
        self.erasing = (
            v2.RandomErasing(p=random_erasing, value=list(erase_value)) if self.train and random_erasing else None
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.train:
            image = self._augment(image, index)
        return image, int(self.labels[index])

    def _augment(self, image: torch.Tensor, index: int) -> torch.Tensor:
        top, left = self.draws.offsets[index].tolist()
        image = v2.functional.crop(image, top, left, self.side, self.side)
        if self.draws.flips[index]:
            image = v2.functional.horizontal_flip(image)
        if self.policy is None and self.erasing is None:
            return self._cutout(image, index)  # nothing draws at random: no seeding to pay for
        # The literature's order: crop, flip, policy, cutout; random erasing last. Inference mode skips
        # autograd bookkeeping on the policies' many small ops (~7% of their time); the images may come
        # out as inference tensors, which the collator's stack turns into an ordinary batch.
        with global_rng_seeded(draw_seed(self.seed, self.epoch, index)), torch.inference_mode():
            if self.policy is not None:
                image = self.policy(image)
            image = self._cutout(image, index)
            if self.erasing is not None:
                image = self.erasing(image)
        return image

    def _cutout(self, image: torch.Tensor, index: int) -> torch.Tensor:
        if not self.cutout:
            return image
        return cutout(image[None], self.draws.cutout_centres[index][None], self.cutout)[0]


def erase_colour(mean: list[float]) -> tuple[int, ...]:
    """The training images' mean colour in uint8: random erasing's fill, about 0 once normalised."""
    return tuple(round(255 * value) for value in mean)


class BatchMixing:
    """``--mixup`` and ``--cutmix``: torchvision v2 ``MixUp``/``CutMix`` on each training batch, its labels
    becoming class probabilities for the soft-target loss.

    With both, each batch gets one of the two, at even odds (timm's default switch). Their draws come from
    (seed, epoch, batch, process) through ``global_rng_seeded``, so a resumed run mixes as an uninterrupted one.
    """

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, num_classes: int, seed: int, process_index: int):
        mixes = [
            mix(alpha=alpha, num_classes=num_classes)
            for mix, alpha in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha))
            if alpha
        ]
        self.transform = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
        self.seed, self.process_index = seed, process_index

    def batches(
        self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], epoch: int, first_batch: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Mix each batch; ``first_batch`` is the index in the epoch of the first one (after a resume, not 0)."""
        for index, (images, labels) in enumerate(batches, start=first_batch):
            with global_rng_seeded(draw_seed(self.seed, epoch, index, self.process_index)):
                mixed_images, targets = self.transform(images, labels)
            yield mixed_images, targets
