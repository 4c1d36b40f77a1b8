"""Datasets for the VAE tasks: MNIST, Fashion-MNIST, statically binarised MNIST, Omniglot.

Files are read in their original formats from a data directory: the ``data_dir`` option, else
the ``ESTBENCH_DATA`` environment variable, else ``./data``. Layout (file names as distributed):

    mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz          (IDX, gzip)
    fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz  (IDX, gzip)
    binarized_mnist.npz (arrays train/valid/test) or
        binarized_mnist_{train,valid,test}.amat                    (Larochelle & Murray 2011)
    omniglot/chardata.mat                                          (the IWAE 28x28 split)

Every file is checked against its published checksum before use. A missing file is downloaded
from its canonical source when the machine has network; otherwise a one-line error says which
file to put where. Images are returned as float32 ``[N, 784]`` in [0, 1] (grey levels) or {0, 1}.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from estbench.errors import EstbenchError

__all__ = [
    "DATASETS",
    "PREPROCESS",
    "resolve_data_dir",
    "load_images",
    "read_idx",
    "read_amat",
    "read_chardata",
    "Preprocessor",
]

DATASETS = ("mnist", "fashion-mnist", "binarized-mnist", "omniglot")
PREPROCESS = ("grey", "dynamic", "static", "threshold")
ENV = "ESTBENCH_DATA"


@dataclass(frozen=True)
class Remote:
    relative: str
    sha256: str | None
    md5: str | None
    urls: tuple[str, ...]


_LECUN = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_ZALANDO = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
_LAROCHELLE = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
_IWAE = "https://github.com/yburda/iwae/raw/master/datasets/OMNIGLOT/chardata.mat"

FILES: dict[str, Remote] = {
    "mnist/train-images-idx3-ubyte.gz": Remote(
        "mnist/train-images-idx3-ubyte.gz",
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "f68b3c2dcbeaaa9fbdd348bbdeb94873", _LECUN),
    "mnist/t10k-images-idx3-ubyte.gz": Remote(
        "mnist/t10k-images-idx3-ubyte.gz",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "9fb629c4189551a2d022fa330f9573f3", _LECUN),
    "fashion-mnist/train-images-idx3-ubyte.gz": Remote(
        "fashion-mnist/train-images-idx3-ubyte.gz",
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d", _ZALANDO),
    "fashion-mnist/t10k-images-idx3-ubyte.gz": Remote(
        "fashion-mnist/t10k-images-idx3-ubyte.gz",
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "bef4ecab320f06d8554ea6380940ec79", _ZALANDO),
    "omniglot/chardata.mat": Remote(
        "omniglot/chardata.mat", None, "21ecaf34373511aa7691cf2e0802aa3d", (_IWAE,)),
}
#: sha256 of ``array.tobytes()`` (uint8, [N, 28, 28]) of the static binarisation's splits
BINARIZED_SHA256 = {
    "train": "43490d4d6ac9002727af4426d8748609fdb7e4094fa65ad8d681ea60082a7a5a",
    "valid": "069b4f0beb389b776478c3e872b4df71c95ac4be64d7cbe6d32e24ebac8e6d5e",
    "test": "ca0294c3b8d984c7a1dc891015a8eea6f37bae59a34e35ea0fc8c47110a8dd86",
}


def resolve_data_dir(option: str | os.PathLike | None = None) -> Path:
    """The data directory: ``option``, else $ESTBENCH_DATA, else ./data."""
    if option:
        return Path(option).expanduser()
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    return Path("data")


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@functools.cache
def _verified(path: Path, size: int, mtime: float, sha256: str | None, md5: str | None) -> bool:
    if sha256 is not None:
        return _digest(path, "sha256") == sha256
    return _digest(path, "md5") == md5


def _download(remote: Remote, target: Path) -> str:
    """Fetch ``remote`` into ``target`` (atomically); returns '' or the last error."""
    last = ""
    for base in remote.urls:
        url = base if base.endswith(Path(remote.relative).name) else base + Path(remote.relative).name
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(url, timeout=30) as response, tempfile.NamedTemporaryFile(
                    dir=target.parent, delete=False) as out:
                shutil.copyfileobj(response, out)
            os.replace(out.name, target)
            return ""
        except OSError as err:
            last = f"{url}: {err}"
    return last


def fetch(relative: str, data_dir: Path, download: bool = True, verify: bool = True) -> Path:
    """The verified local path of a known file, downloading it if missing."""
    remote = FILES[relative]
    path = data_dir / relative
    failure = ""
    if not path.is_file() and download:
        failure = _download(remote, path)
    if not path.is_file():
        reason = f" (download failed: {failure})" if failure else ""
        raise EstbenchError(
            f"dataset file {relative} is missing from {data_dir}{reason}; put it at {path} "
            f"(or point --data-dir / ${ENV} at a directory that has it)"
        )
    stat = path.stat()
    if verify and not _verified(path, stat.st_size, stat.st_mtime, remote.sha256, remote.md5):
        raise EstbenchError(
            f"{path} does not match its published checksum "
            f"({'sha256 ' + remote.sha256[:12] if remote.sha256 else 'md5 ' + str(remote.md5)}...); "
            f"replace it with the original file"
        )
    return path


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped): uint8 images ``[N, rows, cols]`` or labels ``[N]``."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:
        raise EstbenchError(f"{path} is not an unsigned-byte IDX file (magic {magic:#010x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_amat(path: Path) -> np.ndarray:
    """A Larochelle & Murray ``.amat`` text file: one image of 784 digits 0/1 per line."""
    return np.loadtxt(path, dtype=np.uint8).reshape(-1, 28, 28)


def read_chardata(path: Path) -> dict[str, np.ndarray]:
    """The IWAE Omniglot ``chardata.mat`` (MATLAB v5): ``train`` [24345, 784] and ``test``
    [8070, 784] grey levels in [0, 1] (stored as 784 x N, column-major images)."""
    from scipy.io import loadmat

    mat = loadmat(path)
    if "data" not in mat or "testdata" not in mat:
        raise EstbenchError(f"{path} has no 'data' / 'testdata' arrays; is it chardata.mat?")

    def images(key: str) -> np.ndarray:
        raw = np.asarray(mat[key], dtype=np.float32).T  # [N, 784], each column-major 28 x 28
        return raw.reshape(-1, 28, 28).transpose(0, 2, 1).reshape(-1, 784)

    return {"train": images("data"), "test": images("testdata")}


def _binarized(data_dir: Path, split: str, download: bool, verify: bool) -> np.ndarray:
    npz = data_dir / "binarized_mnist.npz"
    if npz.is_file():
        array = np.load(npz)[split]
    else:
        amat = data_dir / f"binarized_mnist_{split}.amat"
        if not amat.is_file() and download:
            remote = Remote(amat.name, None, None, (_LAROCHELLE + amat.name,))
            _download(remote, amat)
        if not amat.is_file():
            raise EstbenchError(
                f"binarized MNIST is missing from {data_dir}; put binarized_mnist.npz or "
                f"binarized_mnist_{{train,valid,test}}.amat there (or set --data-dir / ${ENV})"
            )
        array = read_amat(amat)
    if verify and hashlib.sha256(np.ascontiguousarray(array, dtype=np.uint8).tobytes()).hexdigest() != (
            BINARIZED_SHA256[split]):
        raise EstbenchError(f"binarized MNIST '{split}' in {data_dir} does not match its checksum")
    return array.reshape(len(array), 784).astype(np.float32)


@functools.cache
def _load(dataset: str, split: str, data_dir: Path, download: bool, verify: bool) -> torch.Tensor:
    if dataset == "binarized-mnist":
        return torch.from_numpy(_binarized(data_dir, split, download, verify))
    if dataset == "omniglot":
        path = fetch("omniglot/chardata.mat", data_dir, download, verify)
        arrays = read_chardata(path)
        held_out = 1345  # the DisARM / IWAE validation hold-out from the training split
        chosen = {"train": arrays["train"][:-held_out], "valid": arrays["train"][-held_out:],
                  "test": arrays["test"]}[split]
        return torch.from_numpy(np.ascontiguousarray(chosen))
    prefix = "mnist" if dataset == "mnist" else "fashion-mnist"
    name = "t10k" if split == "test" else "train"
    images = read_idx(fetch(f"{prefix}/{name}-images-idx3-ubyte.gz", data_dir, download, verify))
    images = images.reshape(len(images), 784).astype(np.float32) / 255.0
    if split != "test":
        cut = len(images) * 5 // 6  # 50,000 of 60,000
        images = images[:cut] if split == "train" else images[cut:]
    return torch.from_numpy(np.ascontiguousarray(images))


def load_images(dataset: str, split: str, data_dir: str | Path | None = None,
                download: bool = True, verify: bool = True) -> torch.Tensor:
    """Images ``[N, 784]`` float32 in [0, 1] for split 'train' (MNIST / Fashion-MNIST: the first
    50,000), 'valid' (the last 10,000 of train) or 'test'. ``verify = False`` skips the checksums
    (for test fixtures and one's own copies only)."""
    if dataset not in DATASETS:
        raise EstbenchError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if split not in ("train", "valid", "test"):
        raise EstbenchError(f"split must be train, valid or test, got {split!r}")
    return _load(dataset, split, resolve_data_dir(data_dir).resolve(), download, verify)


class Preprocessor:
    """Turns grey levels into the model's inputs.

    'grey': the grey levels in [0, 1] as they are (a Bernoulli likelihood on them is not a
    log-likelihood bound); 'dynamic': a fresh Bernoulli(grey) draw for every batch (from the
    given generator); 'static': one fixed Bernoulli(grey) draw per image, made once from ``seed``;
    'threshold': 1[grey > 0.5]. Already binary data (binarized-mnist) passes through unchanged.
    """

    def __init__(self, mode: str, seed: int = 0) -> None:
        if mode not in PREPROCESS:
            raise EstbenchError(f"preprocess must be one of {', '.join(PREPROCESS)}, got {mode!r}")
        self.mode = mode
        self.seed = seed

    def fixed(self, images: torch.Tensor) -> torch.Tensor:
        """The part applied once to a whole split."""
        if self.mode == "threshold":
            return (images > 0.5).to(images.dtype)
        if self.mode == "static":
            generator = torch.Generator().manual_seed(self.seed)
            return torch.bernoulli(images, generator=generator)
        return images

    def per_batch(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The part applied to each batch (dynamic binarisation only)."""
        if self.mode == "dynamic":
            noise = torch.rand(batch.shape, generator=generator).to(batch.device)
            return (noise < batch).to(batch.dtype)
        return batch
