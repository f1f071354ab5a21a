"""Batch preprocessing on the device: a drawn uint8 batch becomes normalised model input.

Kept apart from the data sources because it runs per batch, on the GPU where the images
sit, inside the training and evaluation loops: resizing to the model's input size,
ImageNet normalisation and, for training, a seeded per-sample random crop and flip.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINO was trained with ImageNet statistics
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_PADDING = 4

Preprocessor = Callable[[torch.Tensor, bool, torch.Generator | None], torch.Tensor]


def batch_preprocessor(image_size: int) -> Preprocessor:
    """``preprocess_batch`` at a fixed image size, as ``clients.training`` expects it."""

    def preprocess(
        images: torch.Tensor, train: bool, generator: torch.Generator | None
    ) -> torch.Tensor:
        return preprocess_batch(images, image_size, train, generator)

    return preprocess


def preprocess_batch(
    images_uint8: torch.Tensor,
    image_size: int,
    train: bool,
    generator: torch.Generator | None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised float32 (B, 3, S, S) on the images' device.

    Training adds a per-sample random crop (4 px reflect padding) and horizontal flip,
    drawn from ``generator`` (on the images' device or the CPU; None = torch's global
    RNG) so a seed repeats a run. The crop is one gather on the uint8 batch, with the
    reflection folded into the indices, so no padded float copy is made.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise ValueError(
            f"preprocess_batch expects uint8 (B, 3, H, W), got {images_uint8.dtype} "
            f"{tuple(images_uint8.shape)}"
        )
    x = images_uint8
    if train:
        x = _random_crop_flip(x, generator)
    x = x.float()
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.mul_(1.0 / (255.0 * s)).sub_(m / s)


def _random_crop_flip(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Per-sample crop of the reflect-padded image and horizontal flip, in one gather."""
    b, ch, h, w = x.shape
    dev = x.device
    gen_dev = generator.device if generator is not None else dev
    span = 2 * CROP_PADDING + 1
    oy = torch.randint(0, span, (b,), generator=generator, device=gen_dev).to(dev)
    ox = torch.randint(0, span, (b,), generator=generator, device=gen_dev).to(dev)
    flip = (torch.rand(b, generator=generator, device=gen_dev) < 0.5).to(dev)
    rows = _reflect(oy[:, None] + torch.arange(h, device=dev) - CROP_PADDING, h)
    cols = _reflect(ox[:, None] + torch.arange(w, device=dev) - CROP_PADDING, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(ch, device=dev)[None, :, None, None]
    return x[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Index into [0, n) as reflect padding maps it (edge not repeated), for |pad| < n."""
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)
