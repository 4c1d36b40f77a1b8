"""Tiny datasets in the original file formats, written by the tests (no network, no real data)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def _idx_images(images: np.ndarray) -> bytes:
    header = (0x00000803).to_bytes(4, "big") + b"".join(
        d.to_bytes(4, "big") for d in images.shape)
    return header + images.astype(np.uint8).tobytes()


def _blobs(count: int, seed: int) -> np.ndarray:
    """Grey-level 28 x 28 images: a bright disc at a random place on a dark background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    centres = rng.uniform(8, 20, size=(count, 2))
    radius = rng.uniform(3, 7, size=count)
    dist = np.hypot(yy[None] - centres[:, 0, None, None], xx[None] - centres[:, 1, None, None])
    return (255 * np.clip(radius[:, None, None] - dist + 1, 0, 1)).astype(np.uint8)


def write_fixture_data(root: Path, train: int = 120, test: int = 40) -> Path:
    """MNIST / Fashion-MNIST IDX files, binarized_mnist.npz and omniglot/chardata.mat."""
    from scipy.io import savemat

    for folder, seed in (("mnist", 0), ("fashion-mnist", 1)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name, count in (("train", train), ("t10k", test)):
            data = gzip.compress(_idx_images(_blobs(count, seed + len(name))))
            (root / folder / f"{name}-images-idx3-ubyte.gz").write_bytes(data)
    binary = {split: (_blobs(n, 7 + i) > 127).astype(np.uint8)
              for i, (split, n) in enumerate((("train", train), ("valid", test), ("test", test)))}
    np.savez_compressed(root / "binarized_mnist.npz", **binary)
    (root / "omniglot").mkdir(exist_ok=True)
    grey = _blobs(train + test, 9).astype(np.float64) / 255.0
    columns = grey.transpose(0, 2, 1).reshape(len(grey), 784).T  # MATLAB: 784 x N, column-major
    savemat(root / "omniglot" / "chardata.mat",
            {"data": columns[:, :train], "testdata": columns[:, train:]})
    return root
