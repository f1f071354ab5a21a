"""Batch preprocessing: normalisation, resizing and the seeded random crop and flip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flower_app.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, preprocess_batch


def _images(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator())


def test_eval_preprocessing_is_plain_normalisation():
    x = _images(8)
    out = preprocess_batch(x, 32, False, None)
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (x.float() / 255 - mean) / std)
    assert torch.equal(out, preprocess_batch(x, 32, False, None))
    big = preprocess_batch(x, 48, False, None)
    assert big.shape == (8, 3, 48, 48) and big.dtype == torch.float32
    flat = torch.full((1, 3, 32, 32), 200, dtype=torch.uint8)  # resizing keeps a flat image
    torch.testing.assert_close(
        preprocess_batch(flat, 48, False, None), ((200 / 255 - mean) / std).expand(1, 3, 48, 48)
    )


def test_train_preprocessing_is_reproducible_and_varies_per_sample():
    x = _images(16)
    original = x.clone()
    out = preprocess_batch(x, 48, True, torch.Generator().manual_seed(0))
    assert out.shape == (16, 3, 48, 48) and out.dtype == torch.float32
    assert torch.equal(x, original)  # the cached uint8 data is never modified
    same = preprocess_batch(x, 48, True, torch.Generator().manual_seed(0))
    other = preprocess_batch(x, 48, True, torch.Generator().manual_seed(1))
    assert torch.equal(out, same) and not torch.equal(out, other)
    # one image repeated 64 times gets many different crops/flips within a single batch
    repeated = preprocess_batch(x[:1].repeat(64, 1, 1, 1), 32, True, torch.Generator())
    assert len({tuple(r.flatten().tolist()) for r in repeated}) > 20


def test_train_augmentation_is_a_reflect_padded_crop_or_its_mirror():
    x = _images(1).repeat(200, 1, 1, 1)
    out = preprocess_batch(x, 32, True, torch.Generator().manual_seed(0))
    padded = F.pad(preprocess_batch(x[:1], 32, False, None), (4, 4, 4, 4), mode="reflect")[0]
    crops = {}
    for dy in range(9):
        for dx in range(9):
            window = padded[:, dy : dy + 32, dx : dx + 32]
            crops[(dy, dx, False)] = window
            crops[(dy, dx, True)] = window.flip(-1)
    seen = set()
    for image in out:
        match = [key for key, crop in crops.items() if torch.equal(image, crop)]
        assert match, "an augmented image is not a crop of the padded original"
        seen.update(match)
    assert {flip for _, _, flip in seen} == {False, True}
    assert len({(dy, dx) for dy, dx, _ in seen}) > 30  # offsets in 0..8 both ways


def test_train_preprocessing_accepts_no_generator():
    torch.manual_seed(0)
    out = preprocess_batch(_images(4), 32, True, None)
    assert out.shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_batch(torch.zeros(2, 3, 32, 32), 32, False, None)
