"""Synthetic CIFAR-10 files for the tests, and the reference augmentation.

:func:`write_synthetic_cifar` writes a small, deterministic CIFAR-10
look-alike in the official binary layout (resnet_graph.data's formats);
:func:`pad_crop_flip` is the numpy reference the graph's augmentation is
tested against. Both are test tooling, not part of the package.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from resnet_graph.data import (
    CLASS_NAMES,
    IMAGE_SHAPE,
    META_FILE,
    NUM_CLASSES,
    TEST_FILE,
    TRAIN_FILES,
    Split,
    write_binary_batch,
)


def pad_crop_flip(images: np.ndarray, rng) -> np.ndarray:
    """Reference augmentation: 4-pixel zero pad, random crop back to size, random flip.

    For each image independently: pad 4 zero pixels on every side, cut a window
    of the original size at a uniformly random offset (0..8 in each direction),
    and mirror it left-right with probability 1/2. This is the standard CIFAR
    augmentation (He et al. 2016); the graph's version is tested against it.

    Random draws, in this order: ``integers(0, 9, N)`` row offsets,
    ``integers(0, 9, N)`` column offsets, ``random(N) < 0.5`` flips.

    Args:
        images: ``[N, H, W, C]`` of any dtype; the output has the same shape and dtype.
        rng: a ``numpy.random.Generator`` (or a seed for one).
    """
    pad = 4
    rng = np.random.default_rng(rng)
    images = np.asarray(images)
    count, height, width = images.shape[:3]
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = rng.integers(0, 2 * pad + 1, size=count)
    cols = rng.integers(0, 2 * pad + 1, size=count)
    flips = rng.random(count) < 0.5
    row_index = rows[:, None] + np.arange(height)
    steps = np.where(flips[:, None], np.arange(width - 1, -1, -1), np.arange(width))
    col_index = cols[:, None] + steps
    return padded[np.arange(count)[:, None, None], row_index[:, :, None], col_index[:, None, :]]


# Well separated colours, one per class, so the class shows in every crop.
_SYNTHETIC_COLOURS = (
    (220, 40, 40),
    (40, 200, 40),
    (40, 40, 220),
    (220, 220, 40),
    (220, 40, 220),
    (40, 220, 220),
    (235, 235, 235),
    (25, 25, 25),
    (128, 128, 128),
    (230, 140, 30),
)


def synthetic_split(n: int, rng, *, learnable: bool = True) -> Split:
    """``n`` synthetic images with balanced labels, drawn from ``rng``.

    With ``learnable`` each class has its own colour and stripe pattern
    (stripes 1, 2, 4, 8 or 16 pixels wide, horizontal for even classes and
    vertical for odd ones) plus uniform noise of +-40, so a tiny network learns
    it in a few steps. Without it, pixels and labels are uniform noise.
    """
    rng = np.random.default_rng(rng)
    if not learnable:
        images = rng.integers(0, 256, size=(n, *IMAGE_SHAPE), dtype=np.uint8)
        return Split(images, rng.integers(0, NUM_CLASSES, size=n).astype(np.int32))
    labels = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int32)
    coords = np.arange(32)
    patterns = np.empty((NUM_CLASSES, 32, 32), dtype=np.int16)
    for c in range(NUM_CLASSES):
        stripes = ((coords // (2 ** (c // 2))) % 2) * 60 - 30
        patterns[c] = stripes[:, None] if c % 2 == 0 else stripes[None, :]
    noise = rng.integers(-40, 41, size=(n, *IMAGE_SHAPE), dtype=np.int16)
    colours = np.array(_SYNTHETIC_COLOURS, dtype=np.int16)
    pixels = colours[labels][:, None, None, :] + patterns[labels][..., None] + noise
    return Split(np.clip(pixels, 0, 255).astype(np.uint8), labels)


def write_synthetic_cifar(
    directory: str | os.PathLike,
    n_train_per_batch: int = 100,
    n_test: int = 100,
    seed: int = 0,
    learnable: bool = True,
) -> Path:
    """Write a small, deterministic CIFAR-10 look-alike for tests.

    Writes ``data_batch_1.bin`` ... ``data_batch_5.bin`` (``n_train_per_batch``
    records each), ``test_batch.bin`` (``n_test``) and ``batches.meta.txt``
    straight into ``directory`` (created if needed), using
    :func:`synthetic_split`. The same arguments always give the same bytes.

    Returns:
        ``directory`` as a Path, ready for :func:`load_cifar10` (pass a
        ``valid_size`` below ``5 * n_train_per_batch``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in TRAIN_FILES:
        split = synthetic_split(n_train_per_batch, rng, learnable=learnable)
        write_binary_batch(directory / name, split.images, split.labels)
    split = synthetic_split(n_test, rng, learnable=learnable)
    write_binary_batch(directory / TEST_FILE, split.images, split.labels)
    (directory / META_FILE).write_text("\n".join(CLASS_NAMES) + "\n\n", encoding="ascii")
    return directory


