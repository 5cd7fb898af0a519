"""Dataset registry: every dataset becomes one in-memory `ImageDataset` of uint8 images.

Why one shape for all: the view table needs only stable per-sample keys and source sizes, and
`render` needs only uint8 [3, H, W] pixels, so extract/train/verify never special-case a dataset.
Small datasets (Fashion-MNIST, CIFAR, synthetic) hold every image in one uint8 tensor so whole
batches are rendered at once (on the GPU when there is one); ImageFolder trees load lazily.

A `Fingerprint` (name, split, N, hash of the labels) ties a cache to the exact data it was made
from; a `subset` is a deterministic class-stratified choice keyed by sample keys, so the same
(n, seed) always selects the same samples, and its fingerprint differs from the full set's.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kdcache.data.views import DOMAIN_SUBSET, key_hashes, mix
from kdcache.errors import KDCacheError
from kdcache.registry import Registry

SPLITS = ("train", "test")
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

# Normalisation statistics of each training split (used for both splits, so train and test
# pixels are normalised identically).
FASHION_MNIST_STATS = ((0.2860,) * 3, (0.3530,) * 3)
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class Fingerprint:
    """What a cache was made from: a different subset, split or label order is a different
    dataset and must not reuse the cache."""

    name: str
    split: str
    n: int
    label_hash: str  # first 16 hex chars of sha256(labels as int64 little-endian)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "split": self.split, "n": self.n, "label_hash": self.label_hash}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Fingerprint":
        return cls(name=str(d["name"]), split=str(d["split"]), n=int(d["n"]), label_hash=str(d["label_hash"]))


def label_hash(labels: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(labels).astype("<i8").tobytes()).hexdigest()[:16]


@dataclass(eq=False)
class ImageDataset:
    """One split of a dataset: keys, labels, class names, statistics and uint8 images.

    `images` is uint8 [N, 3, H, W] when every image is in RAM at one size; otherwise it is None
    and `image(i)` decodes `paths[i]` (RGB; grayscale repeated to 3 channels). Plain attributes
    only, so the object pickles into spawned DataLoader workers.

    `known_sizes` (int64 [N, 2], height and width) comes from the sample index (data/index.py):
    with it `sizes()` reads no file header, and an image whose decoded size is not its indexed size
    is refused (the file changed since `index_at` was written)."""

    name: str
    split: str
    num_classes: int
    class_names: list[str]
    keys: list[str]
    labels: np.ndarray
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    images: torch.Tensor | None = None
    paths: list[str] | None = None
    folder: str | None = None  # files: the folder the keys are relative to (paths[i] = folder/keys[i])
    known_sizes: np.ndarray | None = field(default=None, repr=False)
    index_at: str | None = None  # where known_sizes were read from (named when a file disagrees)
    _sizes: dict[int, tuple[int, int]] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.keys)
        if len(self.labels) != n:
            raise ValueError(f"{n} keys but {len(self.labels)} labels")
        if self.images is None and (self.paths is None or len(self.paths) != n):
            raise ValueError("an ImageDataset needs either images [N,3,H,W] or one path per key")
        if self.images is not None and (self.images.dtype != torch.uint8 or self.images.dim() != 4
                                        or self.images.shape[0] != n or self.images.shape[1] != 3):
            raise ValueError(f"images must be uint8 [N, 3, H, W] with N={n}, got "
                             f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.known_sizes is not None and np.shape(self.known_sizes) != (n, 2):
            raise ValueError(f"known_sizes must be [N, 2] with N={n}, got {np.shape(self.known_sizes)}")

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return (f"ImageDataset({self.name!r}, split={self.split!r}, n={len(self)}, "
                f"classes={self.num_classes}, in_memory={self.images is not None})")

    def image(self, i: int) -> torch.Tensor:
        """uint8 [3, H, W] of sample i. A file that cannot be decoded (truncated, damaged, not an
        image, gone) raises KDCacheError naming the file and the sample key, never trains."""
        if self.images is not None:
            return self.images[i]
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as im:
                arr = np.array(im.convert("RGB"), dtype=np.uint8)
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ...
            raise self.decode_error(i, exc) from exc
        if self.known_sizes is not None and tuple(arr.shape[:2]) != tuple(int(v) for v in self.known_sizes[i]):
            h, w = (int(v) for v in self.known_sizes[i])
            raise KDCacheError(
                f"image {self.paths[i]} (sample {self.keys[i]!r} of {self.name}/{self.split}) is {arr.shape[0]}x"
                f"{arr.shape[1]} but the sample index {self.index_at} says {h}x{w}: the file changed after it was "
                f"indexed, and the view table was drawn for the old size",
                expected="the files as they were when the index (and any store made from it) was written",
                fix=f"restore the file, or delete {self.index_at} and the stores beside it and extract again")
        self._sizes[i] = arr.shape[:2]
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def image_size(self, i: int) -> tuple[int, int]:
        """(H, W) of sample i; for files only the header is read."""
        if self.images is not None:
            return int(self.images.shape[2]), int(self.images.shape[3])
        if self.known_sizes is not None:
            return int(self.known_sizes[i, 0]), int(self.known_sizes[i, 1])
        if i not in self._sizes:
            from PIL import Image

            try:
                with Image.open(self.paths[i]) as im:
                    w, h = im.size
            except Exception as exc:
                raise self.decode_error(i, exc) from exc
            self._sizes[i] = (h, w)
        return self._sizes[i]

    def decode_error(self, i: int, exc: BaseException) -> KDCacheError:
        """The error for sample i's file that could not be read or decoded."""
        path = self.paths[i] if self.paths is not None else f"sample {i}"
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, FileNotFoundError):
            return KDCacheError(f"image {path} (sample {self.keys[i]!r} of {self.name}/{self.split}) is gone: {reason}",
                                expected="the files that were listed when the dataset was loaded",
                                fix=f"restore {path}, or run the command again to list the folder afresh")
        return KDCacheError(
            f"image {path} (sample {self.keys[i]!r} of {self.name}/{self.split}) cannot be decoded ({reason})",
            expected="a complete image file that Pillow can read",
            fix=f"delete {path} or replace it with an intact copy (deleting it changes the dataset: stores made "
                f"from it must be re-extracted)")

    def sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """(heights [N], widths [N]) int64: what the view table needs."""
        if self.images is not None:
            n, _, h, w = self.images.shape
            return np.full(n, h, dtype=np.int64), np.full(n, w, dtype=np.int64)
        if self.known_sizes is not None:
            return self.known_sizes[:, 0].astype(np.int64), self.known_sizes[:, 1].astype(np.int64)
        hw = np.array([self.image_size(i) for i in range(len(self))], dtype=np.int64).reshape(-1, 2)
        return hw[:, 0].copy(), hw[:, 1].copy()

    @property
    def fingerprint(self) -> Fingerprint:
        return Fingerprint(self.name, self.split, len(self), label_hash(self.labels))

    def take(self, indices: np.ndarray) -> "ImageDataset":
        """A new dataset of the given samples (keys, labels, images or paths follow)."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageDataset(
            name=self.name, split=self.split, num_classes=self.num_classes, class_names=list(self.class_names),
            keys=[self.keys[i] for i in idx], labels=self.labels[idx], mean=self.mean, std=self.std,
            images=None if self.images is None else self.images[torch.from_numpy(idx)],
            paths=None if self.paths is None else [self.paths[i] for i in idx], folder=self.folder,
            known_sizes=None if self.known_sizes is None else self.known_sizes[idx], index_at=self.index_at,
            _sizes={k: self._sizes[int(i)] for k, i in enumerate(idx) if int(i) in self._sizes})


# A factory loads one split: factory(split, root, download, seed) -> ImageDataset.
Factory = Callable[[str, "str | None", bool, int], ImageDataset]
DATASETS: Registry[Factory] = Registry("dataset", "--dataset")
_CHECKS: dict[str, Callable[["str | None", bool], None]] = {}


def _checker(name: str):
    def add(fn):
        _CHECKS[name] = fn
        return fn
    return add


def _keys(split: str, n: int) -> list[str]:
    width = max(6, len(str(n - 1)))
    return [f"{split}/{i:0{width}d}" for i in range(n)]


def _rgb_from_hwc(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()


# --- Fashion-MNIST ---------------------------------------------------------------------------
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
_FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _fmnist_dirs(root: str | None) -> list[Path]:
    dirs = []
    if root is not None:
        dirs += [Path(root), Path(root) / "FashionMNIST" / "raw", Path(root) / "fashion-mnist"]
    dirs.append(FASHION_MNIST_SYSTEM_DIR)
    return dirs


def _find_idx(d: Path, stem: str) -> Path | None:
    for p in (d / (stem + ".gz"), d / stem):
        if p.is_file():
            return p
    return None


def _fmnist_locate(split: str, root: str | None) -> tuple[Path, Path] | None:
    img_stem, lab_stem = _FMNIST_FILES[split]
    for d in _fmnist_dirs(root):
        img, lab = _find_idx(d, img_stem), _find_idx(d, lab_stem)
        if img is not None and lab is not None:
            return img, lab
    return None


def _fmnist_missing(split: str, root: str | None) -> KDCacheError:
    looked = ", ".join(str(d) for d in _fmnist_dirs(root))
    return KDCacheError(
        f"Fashion-MNIST {split} files ({_FMNIST_FILES[split][0]}[.gz], {_FMNIST_FILES[split][1]}[.gz]) "
        f"not found; looked in: {looked}",
        fix="apt-get install dataset-fashion-mnist, or pass --download (with --data-root DIR) "
            "to fetch it with torchvision")


def _read_idx(path: Path, magic: int) -> np.ndarray:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = zlib.decompress(raw, 16 + zlib.MAX_WBITS)  # one call: faster than gzip's stream
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise KDCacheError(f"{path} is not an idx file (magic {got:#x}, expected {magic:#x})",
                           fix=f"delete {path} and fetch it again (apt-get install dataset-fashion-mnist or --download)")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise KDCacheError(f"{path} is truncated ({data.size} bytes of data for shape {dims})",
                           fix=f"delete {path} and fetch it again")
    return data.reshape(dims)


@DATASETS.register("fashion-mnist")
def _load_fashion_mnist(split: str, root: str | None, download: bool, seed: int) -> ImageDataset:
    found = _fmnist_locate(split, root)
    if found is None and download:
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(root or "./data", train=split == "train", download=True)
        except OSError as exc:  # no network (URLError), or the download was cut
            raise KDCacheError(f"could not download fashion-mnist ({getattr(exc, 'reason', exc)})",
                               fix="apt-get install dataset-fashion-mnist (no --download needed)") from exc
        found = _fmnist_locate(split, root or "./data")
    if found is None:
        raise _fmnist_missing(split, root)
    img_path, lab_path = found
    gray = _read_idx(img_path, 0x803)
    labels = _read_idx(lab_path, 0x801).astype(np.int64)
    if len(gray) != len(labels):
        raise KDCacheError(f"{img_path} has {len(gray)} images but {lab_path} has {len(labels)} labels")
    images = torch.from_numpy(gray.copy()).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    mean, std = FASHION_MNIST_STATS
    return ImageDataset("fashion-mnist", split, 10, list(FASHION_MNIST_CLASSES), _keys(split, len(labels)),
                        labels, mean, std, images=images)


@_checker("fashion-mnist")
def _check_fashion_mnist(root: str | None, download: bool) -> None:
    if download:
        return
    for split in SPLITS:
        if _fmnist_locate(split, root) is None:
            raise _fmnist_missing(split, root)


# --- CIFAR -----------------------------------------------------------------------------------
_CIFAR = {"cifar10": ("CIFAR10", "cifar-10-batches-py", CIFAR10_STATS, 10),
          "cifar100": ("CIFAR100", "cifar-100-python", CIFAR100_STATS, 100)}


def _cifar_missing(name: str, root: str) -> KDCacheError:
    folder = Path(root) / _CIFAR[name][1]
    return KDCacheError(f"{name} not found (or incomplete) at {folder}",
                        expected=f"the python version of {name}, extracted as {folder}",
                        fix=f"pass --download to fetch it with torchvision (or --data-root DIR where "
                            f"{_CIFAR[name][1]}/ lives)")


def _cifar_factory(name: str) -> Factory:
    cls_name, folder, (mean, std), num_classes = _CIFAR[name]

    def load(split: str, root: str | None, download: bool, seed: int) -> ImageDataset:
        import torchvision.datasets as tvd

        root = root or "./data"
        if not download and not (Path(root) / folder).is_dir():
            raise _cifar_missing(name, root)
        try:
            ds = getattr(tvd, cls_name)(root, train=split == "train", download=download)
        except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
            raise _cifar_missing(name, root) from exc
        except OSError as exc:  # no network (URLError), or the download was cut
            raise KDCacheError(f"could not download {name} into {root} ({getattr(exc, 'reason', exc)})",
                               expected=f"the internet, or {folder}/ already under {root}",
                               fix=f"copy {folder}/ (the python version) into {root} and run again "
                                   "(the pipeline's download = true is then harmless)") from exc
        labels = np.asarray(ds.targets, dtype=np.int64)
        return ImageDataset(name, split, num_classes, list(ds.classes), _keys(split, len(labels)), labels,
                            mean, std, images=_rgb_from_hwc(ds.data))

    def check(root: str | None, download: bool) -> None:
        if not download and not (Path(root or "./data") / folder).is_dir():
            raise _cifar_missing(name, root or "./data")

    load.__doc__ = f"{name} via torchvision (python version), images kept as uint8 [N, 3, 32, 32]."
    _CHECKS[name] = check
    return load


DATASETS.add("cifar10", _cifar_factory("cifar10"))
DATASETS.add("cifar100", _cifar_factory("cifar100"))


# --- ImageFolder -----------------------------------------------------------------------------
# The folder each split may live in, first match wins: the evaluation split is test/ (kdcache's
# name) or val/ (ImageNet's convention), so an ImageNet tree works as it is unpacked.
IMAGEFOLDER_DIRS = {"train": ("train",), "test": ("test", "val")}


def _imagefolder_split_dir(root: str | None, split: str) -> Path:
    names = IMAGEFOLDER_DIRS[split]
    shown = " or ".join(f"{n}/" for n in names)
    if root is None:
        raise KDCacheError("dataset 'imagefolder' needs a data root",
                           expected="ROOT/train/<class>/<image> and ROOT/test/ (or ROOT/val/)<class>/<image>",
                           fix="pass --data-root ROOT")
    for name in names:
        d = Path(root) / name
        if d.is_dir():
            return d
    missing = " nor ".join(str(Path(root) / n) for n in names)
    raise KDCacheError(f"imagefolder {split} split folder missing: neither {missing} exists" if len(names) > 1
                       else f"imagefolder split folder {Path(root) / names[0]} does not exist",
                       expected=f"{Path(root)}/{names[0]}/<class>/<image files>"
                                + (f" (or {Path(root)}/{names[1]}/...)" if len(names) > 1 else ""),
                       fix=f"point --data-root at the folder that holds {shown}, or create it")


def _class_dirs(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[str]:
    """Image files under `folder` at any depth, as paths relative to it, in the order kdcache has
    always used (Path order: component by component). os.walk reads each folder once and tells
    files from folders without a stat per file: listing ImageNet's 1.28M files takes seconds."""
    found = []
    for top, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        rel = os.path.relpath(top, folder)
        for f in files:
            if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                found.append(f if rel == "." else os.path.join(rel, f))
    found.sort(key=lambda r: r.split(os.sep))
    return found


@DATASETS.register("imagefolder")
def _load_imagefolder(split: str, root: str | None, download: bool, seed: int) -> ImageDataset:
    """ROOT/<split>/<class>/<file> (the test split: ROOT/test/, else ROOT/val/); classes come from
    ROOT/train when it exists, so the test split gets the same class indices even if it lacks a
    class folder.

    A class folder that exists but holds no image file is refused (KDCacheError naming it): kept,
    it would be a class with 0 samples that the model still predicts; skipped, the class indices
    of every later class would shift. Delete the folder (from both splits) or fill it. Files that
    cannot be decoded are refused when they are read (`ImageDataset.image`), naming the file.
    Image sizes are not read here: `load_dataset(..., index=)` takes them from the sample index."""
    d = _imagefolder_split_dir(root, split)
    train_dir = Path(root) / "train"
    classes = _class_dirs(train_dir if train_dir.is_dir() else d)
    extra = sorted(set(_class_dirs(d)) - set(classes))
    if extra:
        raise KDCacheError(f"{d} has class folders that {train_dir} lacks: {', '.join(extra[:10])}",
                           fix="give both splits the same class folders")
    if not classes:
        raise KDCacheError(f"{d} has no class folders", expected=f"{d}/<class>/<image files>")
    keys, paths, labels = [], [], []
    for c, cname in enumerate(classes):
        cdir = d / cname
        if not cdir.is_dir():
            continue
        files = _image_files(cdir)
        if not files:
            raise KDCacheError(
                f"class folder {cdir} has no images: class {cname!r} would have 0 {split} samples",
                expected=f"at least one file ending in {', '.join(IMAGE_EXTENSIONS)} in every class folder",
                fix=f"add images to {cdir}, or delete the folder (from every split, if the class should not exist)")
        base = str(cdir) + os.sep
        for rel in files:
            keys.append(f"{cname}/{rel}" if os.sep == "/" else f"{cname}/{Path(rel).as_posix()}")
            paths.append(base + rel)
        labels += [c] * len(files)
    if not keys:
        raise KDCacheError(f"no images under {d}",
                           expected=f"files ending in {', '.join(IMAGE_EXTENSIONS)} in {d}/<class>/")
    mean, std = IMAGENET_STATS
    return ImageDataset("imagefolder", split, len(classes), classes, keys, np.array(labels, dtype=np.int64),
                        mean, std, images=None, paths=paths, folder=str(d))


@_checker("imagefolder")
def _check_imagefolder(root: str | None, download: bool) -> None:
    for split in SPLITS:
        _imagefolder_split_dir(root, split)


# --- synthetic (tests) -----------------------------------------------------------------------
SYNTHETIC_SIZES = {"train": 512, "test": 256}
_PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [250, 190, 190], [128, 128, 128]],
                    dtype=np.float32)


def _synthetic(split: str, seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Class c = a palette colour plus a stripe pattern (orientation c % 2, frequency c // 2 + 1),
    with per-image brightness, phase and pixel noise: both cues survive crops and flips, so a
    small CNN learns it in one epoch."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, SPLITS.index(split), 0x5EED])
    labels = rng.permutation(np.arange(n) % 10).astype(np.int64)
    yy, xx = np.meshgrid(np.arange(32, dtype=np.float32), np.arange(32, dtype=np.float32), indexing="ij")
    coord = np.where((labels % 2 == 0)[:, None, None], yy[None], xx[None])  # [n, 32, 32]
    freq = (labels // 2 + 1).astype(np.float32)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
    stripes = 45.0 * np.sin(2 * np.pi * freq * coord / 32.0 + phase)
    bright = rng.uniform(0.7, 1.0, (n, 1, 1, 1)).astype(np.float32)
    base = _PALETTE[labels][:, :, None, None] * bright  # [n, 3, 1, 1]
    noise = rng.normal(0, 20, (n, 3, 32, 32)).astype(np.float32)
    img = np.clip(base + stripes[:, None] + noise, 0, 255).round().astype(np.uint8)
    return img, labels


@DATASETS.register("synthetic")
def _load_synthetic(split: str, root: str | None, download: bool, seed: int) -> ImageDataset:
    n = SYNTHETIC_SIZES[split]
    img, labels = _synthetic(split, seed, n)
    train = img if split == "train" else _synthetic("train", seed, SYNTHETIC_SIZES["train"])[0]
    t = train.astype(np.float64) / 255.0  # statistics of the training split, for both splits
    mean = tuple(float(m) for m in t.mean(axis=(0, 2, 3)))
    std = tuple(float(s) for s in t.std(axis=(0, 2, 3)))
    return ImageDataset("synthetic", split, 10, [f"class{c}" for c in range(10)], _keys(split, n), labels,
                        mean, std, images=torch.from_numpy(img))


@_checker("synthetic")
def _check_synthetic(root: str | None, download: bool) -> None:
    return None


# --- public entry points ---------------------------------------------------------------------
def subset_indices(labels: np.ndarray, keys: list[str], n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-stratified subset of n samples.

    Each class gets n * (its share), rounded by largest remainder; inside a class the samples
    with the smallest mix(seed, key) are kept, so the choice depends on keys, not positions."""
    labels = np.asarray(labels, dtype=np.int64)
    N = len(labels)
    if n >= N:
        return np.arange(N, dtype=np.int64)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    exact = counts * (n / N)
    quota = np.floor(exact).astype(np.int64)
    short = n - int(quota.sum())
    if short > 0:  # largest remainders first, ties to the lower class index
        order = np.lexsort((np.arange(len(classes)), -(exact - quota)))
        quota[order[:short]] += 1
    rank_key = mix(DOMAIN_SUBSET, int(seed), key_hashes(keys))
    order = np.lexsort((rank_key, inverse))  # by class, then by hash
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    chosen = [order[s:s + q] for s, q in zip(start, quota)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def load_dataset(name: str, split: str = "train", *, root: str | None = None, download: bool = False,
                 subset: int | None = None, seed: int = 0, index=None, workers: int = 0) -> ImageDataset:
    """Load one split of a registered dataset, optionally a stratified subset of `subset` samples.

    A subset larger than the split is refused (naming the split's size); `subset == len` is the
    whole split (and its fingerprint).

    `seed` picks the subset (and the synthetic data); keys stay the full set's keys, so a sample
    keeps its views whether or not it is in a subset.

    `index` (a path or URL, `index.index_location`): for a dataset of files, where the sample index
    of the whole split is kept; image sizes are read from it (built there first by `workers`
    processes when it is absent, damaged or stale), never from the files' headers."""
    factory = DATASETS.get(name)
    if split not in SPLITS:
        raise KDCacheError(f"unknown split {split!r}", expected=f"one of: {', '.join(SPLITS)}",
                           fix="use --split train or --split test")
    if subset is not None and (not isinstance(subset, (int, np.integer)) or subset < 1):
        raise KDCacheError(f"subset must be a positive number of samples, got {subset!r}",
                           fix="pass --subset N with N >= 1, or leave it out for the whole split")
    ds = factory(split, root, download, seed)
    if index is not None and ds.images is None:
        from kdcache.data.index import with_index

        ds = with_index(ds, index, workers)
    if subset is not None and subset > len(ds):
        raise KDCacheError(f"--subset {subset} is larger than {name} {split}, which has {len(ds)} samples",
                           expected=f"a subset of 1 to {len(ds)} samples",
                           fix=f"pass --subset {len(ds)} or less, or leave --subset out for the whole split")
    if subset is not None and subset < len(ds):
        ds = ds.take(subset_indices(ds.labels, ds.keys, int(subset), seed))
    return ds


def check_available(name: str, *, root: str | None = None, download: bool = False) -> None:
    """Raise KDCacheError (what is missing, where it was looked for, the fix) unless both splits of
    `name` can be loaded, without loading them."""
    DATASETS.get(name)
    check = _CHECKS.get(name)
    if check is not None:
        check(root, download)
