"""Image data sets: loaders, caching and deterministic splits.

Every loader returns float32 images in [0, 1] shaped N x C x H x W, int64
labels and class names (DESIGN.md section 3, "Data"). Splits are seeded:
``train`` (to train or attack a model), ``defense`` (the defender's small
clean set) and ``eval`` (held out; never seen by a defense), the last two
disjoint.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gdm_ray.core.errors import ConfigError, DataError

__all__ = [
    "ImageSet",
    "DataSpec",
    "Splits",
    "load_splits",
    "load_fashion_mnist",
    "load_imagefolder",
    "load_npz",
    "make_synthetic",
    "DATASETS",
    "FASHION_MNIST_CLASSES",
]

DATASETS = ("fashion_mnist", "cifar10", "imagefolder", "npz", "synthetic")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class ImageSet:
    """Images (N x C x H x W float32 in [0, 1]) with int64 labels and class names."""

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if self.x.dim() != 4:
            raise DataError(f"images must be N x C x H x W, got shape {tuple(self.x.shape)}")
        if self.x.shape[0] != self.y.shape[0]:
            raise DataError(f"{self.x.shape[0]} images but {self.y.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """C, H, W of one image."""
        return tuple(int(s) for s in self.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, idx: torch.Tensor) -> ImageSet:
        return ImageSet(self.x[idx], self.y[idx], self.classes)


@dataclass
class Splits:
    train: ImageSet
    defense: ImageSet
    eval: ImageSet
    name: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.train.shape if len(self.train) else self.eval.shape

    @property
    def classes(self) -> list[str]:
        return self.eval.classes


@dataclass
class DataSpec:
    """Which data set to load and how to split it (the ``data`` config group).

    For sets that come with a train/test division (fashion_mnist, cifar10, an
    image folder with train/ and test/), ``train`` is the official train part
    and the test part is shuffled and cut into ``defense`` (a
    ``defense_fraction`` of it) and ``eval``. Other sets are shuffled and cut by
    ``fractions`` (train, defense, eval). ``limit_*`` cap each split (0 = all).
    """

    name: str = "synthetic"
    path: str | None = None
    seed: int = 0
    defense_fraction: float = 0.5
    fractions: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    limit_train: int = 0
    limit_defense: int = 0
    limit_eval: int = 0
    cache_dir: str | None = None
    # synthetic only
    num_classes: int = 4
    image_size: list[int] = field(default_factory=lambda: [16, 16])
    channels: int = 1
    samples: int = 2000

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ConfigError(f"data.name={self.name!r} is not one of {', '.join(DATASETS)}")
        if not 0.0 < float(self.defense_fraction) < 1.0:
            raise ConfigError(f"data.defense_fraction={self.defense_fraction} must be in (0, 1)")
        fr = [float(f) for f in self.fractions]
        if len(fr) != 3 or min(fr) < 0 or fr[1] <= 0 or fr[2] <= 0 or sum(fr) > 1.0 + 1e-9:
            raise ConfigError(f"data.fractions={self.fractions} must be 3 shares (train, defense, eval) summing to <= 1")
        for k in ("limit_train", "limit_defense", "limit_eval"):
            if int(getattr(self, k)) < 0:
                raise ConfigError(f"data.{k}={getattr(self, k)} must be >= 0")


def load_splits(spec: DataSpec) -> Splits:
    """Load the data set a spec names and cut it into seeded splits."""
    name = spec.name
    if name == "fashion_mnist":
        root = Path(spec.path or FASHION_MNIST_DIR)
        train = load_fashion_mnist(root, "train")
        test = load_fashion_mnist(root, "t10k")
        splits = _split_test(train, test, spec)
    elif name in ("cifar10", "imagefolder"):
        if not spec.path:
            raise ConfigError(f"data.path is required for data.name={name}")
        parts = load_imagefolder(Path(spec.path), cache_dir=spec.cache_dir)
        if "train" in parts and "test" in parts:
            splits = _split_test(parts["train"], parts["test"], spec)
        elif name == "cifar10":
            raise DataError(f"data.path={spec.path}: a cifar10 folder needs train/ and test/ subfolders")
        else:
            splits = _split_pool(parts["all"], spec)
    elif name == "npz":
        if not spec.path:
            raise ConfigError("data.path is required for data.name=npz")
        splits = _split_pool(load_npz(Path(spec.path)), spec)
    else:
        pool = make_synthetic(int(spec.samples), int(spec.num_classes), tuple(spec.image_size), int(spec.channels), int(spec.seed))
        splits = _split_pool(pool, spec)
    splits.name = name
    return _apply_limits(splits, spec)


def _perm(n: int, seed: int, salt: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + salt))


def _split_test(train: ImageSet, test: ImageSet, spec: DataSpec) -> Splits:
    if train.shape != test.shape:
        raise DataError(f"train images are {train.shape} but test images are {test.shape}")
    p = _perm(len(test), int(spec.seed), 1)
    k = int(round(len(test) * float(spec.defense_fraction)))
    return Splits(train, test.subset(p[:k]), test.subset(p[k:]))


def _split_pool(pool: ImageSet, spec: DataSpec) -> Splits:
    p = _perm(len(pool), int(spec.seed), 2)
    n = len(pool)
    a = int(round(n * float(spec.fractions[0])))
    b = a + int(round(n * float(spec.fractions[1])))
    c = min(n, b + int(round(n * float(spec.fractions[2]))))
    if b <= a or c <= b:
        raise DataError(f"data set of {n} images is too small for fractions {list(spec.fractions)}")
    return Splits(pool.subset(p[:a]), pool.subset(p[a:b]), pool.subset(p[b:c]))


def _apply_limits(s: Splits, spec: DataSpec) -> Splits:
    def cap(part: ImageSet, k: int) -> ImageSet:
        return part.subset(torch.arange(k)) if 0 < k < len(part) else part

    # defense and eval are seeded shuffles already, so a prefix is a uniform sample; a train/ folder is
    # not (an ImageFolder lists it class by class: its first 20,000 CIFAR-10 images are classes 0-3 only)
    k = int(spec.limit_train)
    train = s.train.subset(_perm(len(s.train), int(spec.seed), 3)[:k].sort().values) if 0 < k < len(s.train) else s.train
    return Splits(
        train,
        cap(s.defense, int(spec.limit_defense)),
        cap(s.eval, int(spec.limit_eval)),
        s.name,
    )


# --- Fashion-MNIST (IDX) -------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: not an IDX file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: IDX header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def load_fashion_mnist(root: Path, part: str) -> ImageSet:
    """One part ("train" or "t10k") of Fashion-MNIST from IDX files in root."""

    def find(stem: str) -> Path:
        for cand in (root / f"{stem}.gz", root / stem):
            if cand.exists():
                return cand
        hint = ""
        if str(root) == FASHION_MNIST_DIR:
            hint = " (install it with: apt-get install -y dataset-fashion-mnist)"
        raise DataError(f"data.path={root}: {stem}[.gz] not found{hint}")

    x = _read_idx(find(f"{part}-images-idx3-ubyte"))
    y = _read_idx(find(f"{part}-labels-idx1-ubyte"))
    if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise DataError(f"data.path={root}: {part} images {x.shape} and labels {y.shape} do not match")
    return _from_uint8(x[:, None], y, FASHION_MNIST_CLASSES)


def _from_uint8(x: np.ndarray, y: np.ndarray, classes: list[str]) -> ImageSet:
    """uint8 N x C x H x W -> float32 in [0, 1]."""
    xt = torch.from_numpy(np.require(x, requirements=("C", "W"))).float().div_(255.0)
    return ImageSet(xt, torch.from_numpy(np.asarray(y, dtype=np.int64)), list(classes))


# --- npz -----------------------------------------------------------------------


def load_npz(path: Path) -> ImageSet:
    """Arrays ``x`` (uint8 N x H x W / N x H x W x C, or float N x C x H x W in [0, 1]) and ``y``."""
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy array
            raise DataError(f"data.path={path}: a single .npy array, not an npz archive with arrays 'x' and 'y'")
        with z:
            if "x" not in z or "y" not in z:
                raise DataError(f"data.path={path}: npz needs arrays 'x' and 'y', found {sorted(z.files)}")
            x, y = z["x"], z["y"]
            classes = [str(c) for c in z["classes"]] if "classes" in z else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"data.path={path}: not a readable npz file ({exc})") from None
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"data.path={path}: y must be a 1-D integer array, got {y.dtype} {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"data.path={path}: {x.shape[0]} images but {y.shape[0]} labels")
    if y.size and y.min() < 0:
        raise DataError(f"data.path={path}: labels must be >= 0, found {int(y.min())}")
    if x.dtype == np.uint8:
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4:
            x = x.transpose(0, 3, 1, 2)
        else:
            raise DataError(f"data.path={path}: uint8 x must be N x H x W or N x H x W x C, got {x.shape}")
        data = _from_uint8(x, y, [])
    elif np.issubdtype(x.dtype, np.floating):
        if x.ndim != 4:
            raise DataError(f"data.path={path}: float x must be N x C x H x W, got {x.shape}")
        if x.size and (np.nanmin(x) < 0 or np.nanmax(x) > 1 or np.isnan(x).any()):
            raise DataError(f"data.path={path}: float x must lie in [0, 1]")
        data = ImageSet(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64)), [])
    else:
        raise DataError(f"data.path={path}: x has dtype {x.dtype}; expected uint8 or float images")
    if data.x.shape[1] not in (1, 3, 4) and data.x.shape[1] > 16:
        raise DataError(f"data.path={path}: x has {data.x.shape[1]} channels; is it N x C x H x W?")
    k = int(y.max()) + 1 if y.size else 0
    data.classes = classes if classes and len(classes) >= k else [str(i) for i in range(k)]
    return data


# --- image folders (and tar archives of them) ----------------------------------


def load_imagefolder(path: Path, cache_dir: str | None = None) -> dict[str, ImageSet]:
    """An ImageFolder tree (``class/img``), optionally under ``train/`` and ``test/``,
    as a directory or a .tar/.tar.gz of one. Returns {"train", "test"} or {"all"}.

    Decoding tens of thousands of JPEGs takes a while, so the decoded arrays
    are cached (keyed by the path, size and mtime) and the second load is fast.
    """
    if not path.exists():
        raise DataError(f"data.path={path} does not exist")
    cache = _cache_file(path, cache_dir)
    if cache is not None and cache.exists():
        try:
            return _read_cache(cache)
        except (OSError, ValueError, KeyError):
            pass  # a stale or damaged cache is rebuilt below
    entries = _tar_entries(path) if path.is_file() else _dir_entries(path)
    parts = _decode_parts(path, entries)
    if cache is not None:
        _write_cache(cache, parts)
    return parts


def _dir_entries(root: Path) -> list[tuple[str, object]]:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            out.append((p.relative_to(root).as_posix(), p))
    return out


def _tar_entries(path: Path) -> list[tuple[str, object]]:
    try:
        tf = tarfile.open(path)
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"data.path={path}: neither a folder nor a readable tar archive ({exc})") from None
    out = []
    with tf:
        for m in tf:
            if not m.isfile() or Path(m.name).name.startswith("."):
                continue
            f = tf.extractfile(m)
            if f is not None:
                out.append((m.name, f.read()))
    return out


def _decode_parts(path: Path, entries: list[tuple[str, object]]) -> dict[str, ImageSet]:
    from PIL import Image, UnidentifiedImageError

    # Strip a common top folder (e.g. "cifar10/train/cat/1.jpg").
    rels = [tuple(Path(n).parts) for n, _ in entries]
    while rels and len({r[0] for r in rels}) == 1 and min(len(r) for r in rels) > 2:
        rels = [r[1:] for r in rels]
    has_split = any(r[0] in ("train", "test") and len(r) >= 3 for r in rels)
    grouped: dict[str, list[tuple[str, object, str]]] = {}
    for (name, src), rel in zip(entries, rels):
        if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if has_split:
            if len(rel) < 3 or rel[0] not in ("train", "test"):
                continue
            part, cls = rel[0], rel[1]
        else:
            if len(rel) < 2:
                continue
            part, cls = "all", rel[-2]
        grouped.setdefault(part, []).append((name, src, cls))
    if not grouped:
        raise DataError(f"data.path={path}: no images found in class subfolders (expected CLASS/IMAGE.png)")
    classes = sorted({c for items in grouped.values() for _, _, c in items})
    index = {c: i for i, c in enumerate(classes)}
    parts = {}
    for part, items in grouped.items():
        arrays, labels, size, mode = [], [], None, None
        for name, src, cls in items:
            try:
                img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
                img.load()
            except (OSError, UnidentifiedImageError, ValueError):
                raise DataError(f"data.path={path}: {name} is not a readable image") from None
            if mode is None:
                mode = "L" if img.mode in ("L", "1", "I;16", "I") else "RGB"
                size = img.size
            img = img.convert(mode)
            if img.size != size:
                raise DataError(f"data.path={path}: {name} is {img.size[0]}x{img.size[1]}, others {size[0]}x{size[1]}")
            arrays.append(np.asarray(img, dtype=np.uint8))
            labels.append(index[cls])
        x = np.stack(arrays)
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
        parts[part] = _from_uint8(x, np.array(labels), classes)
    return parts


def _cache_file(path: Path, cache_dir: str | None) -> Path | None:
    root = Path(cache_dir) if cache_dir else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gdm-ray"
    st = path.stat()
    stamp = f"{st.st_size}|{st.st_mtime_ns}"
    if path.is_dir():
        # A folder's own mtime misses images added or replaced inside its
        # class subfolders, so a folder is keyed on every file in it.
        h = hashlib.sha256()
        for p in sorted(path.rglob("*")):
            if p.is_file():
                fs = p.stat()
                h.update(f"{p.relative_to(path).as_posix()}|{fs.st_size}|{fs.st_mtime_ns}\n".encode())
        stamp = h.hexdigest()
    key = hashlib.sha256(f"{path.resolve()}|{stamp}".encode()).hexdigest()[:20]
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # read-only home: work without a cache
    return root / f"imagefolder-{key}.npz"


def _write_cache(cache: Path, parts: dict[str, ImageSet]) -> None:
    arrays = {}
    for part, s in parts.items():
        arrays[f"{part}_x"] = (s.x * 255).round().to(torch.uint8).numpy()
        arrays[f"{part}_y"] = s.y.numpy()
        arrays["classes"] = np.array(s.classes)
    fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, cache)
    except OSError:
        Path(tmp).unlink(missing_ok=True)


def _read_cache(cache: Path) -> dict[str, ImageSet]:
    with np.load(cache, allow_pickle=False) as z:
        classes = [str(c) for c in z["classes"]]
        parts = {k[:-2] for k in z.files if k.endswith("_x")}
        return {p: _from_uint8(z[f"{p}_x"], z[f"{p}_y"], classes) for p in parts}


# --- synthetic -----------------------------------------------------------------


def make_synthetic(
    n: int = 2000, num_classes: int = 4, image_size: tuple[int, int] = (16, 16), channels: int = 1, seed: int = 0
) -> ImageSet:
    """A tiny learnable data set: each class is a smooth random prototype
    (low-frequency blobs) plus per-image noise and brightness jitter."""
    if n < num_classes or num_classes < 2:
        raise ConfigError(f"synthetic data needs num_classes >= 2 and samples >= num_classes (got {num_classes}, {n})")
    rng = torch.Generator().manual_seed(seed)
    h, w = int(image_size[0]), int(image_size[1])
    coarse = torch.rand(num_classes, channels, max(2, h // 4), max(2, w // 4), generator=rng)
    protos = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=rng)]
    noise = torch.rand(n, channels, h, w, generator=rng) - 0.5
    gain = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=rng)
    x = (protos[y] * gain + 0.35 * noise).clamp_(0, 1)
    return ImageSet(x.contiguous(), y.long(), [f"class{i}" for i in range(num_classes)])
