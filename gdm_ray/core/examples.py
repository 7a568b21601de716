"""A model's own clean examples: the example folder TrojAI ships beside each model.

TrojAI's layout keeps, beside ``id-00000001/model.pt``, a folder of clean
example images (``clean-example-data/``; ``clean_example_data/`` and
``examples/`` are read alike). An image's label is in its name
(``class_K_example_N.png``: class K) or in a ``.json`` beside it (an integer,
or an object with ``clean_label``, ``label`` or ``class``). ``load_examples``
reads a folder as uint8 arrays (what ``gdm-ray trojai`` writes to an npz),
``example_set`` as the scan's ``ImageSet``. Every error is one line naming
the folder and, where one is to blame, the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from gdm_ray.core.data import ImageSet
from gdm_ray.core.errors import DataError

__all__ = ["EXAMPLE_FOLDERS", "EXAMPLE_SUFFIXES", "find_examples", "count_examples", "load_examples", "example_set"]

# the names an example folder beside a model file goes by, in the order they are looked for
EXAMPLE_FOLDERS = ("clean-example-data", "clean_example_data", "examples")
EXAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_CLASS_IN_NAME = re.compile(r"class_(\d+)")


def find_examples(model_file: Path) -> Path | None:
    """The example folder beside ``model_file`` (the first of ``EXAMPLE_FOLDERS`` there), or None."""
    return next((d for d in (model_file.parent / name for name in EXAMPLE_FOLDERS) if d.is_dir()), None)


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: no such example folder")
    return [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in EXAMPLE_SUFFIXES]


def count_examples(folder: Path) -> int:
    """How many example images ``folder`` holds (read none of them)."""
    return len(_images(folder))


def _label(folder: Path, image: Path) -> int:
    m = _CLASS_IN_NAME.search(image.stem)
    if m:
        return int(m.group(1))
    side = image.with_suffix(".json")
    if not side.is_file():
        raise DataError(f"{folder}: {image.name} has no class in its name (class_K_...) and no .json label")
    try:
        meta = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{folder}: {side.name} is not readable JSON ({type(exc).__name__})") from None
    found = next((meta[k] for k in ("clean_label", "label", "class") if k in meta), None) if isinstance(meta, dict) else meta
    if not isinstance(found, int) or isinstance(found, bool) or found < 0:
        raise DataError(f"{folder}: {side.name} names no integer label >= 0")
    return found


def _pixels(folder: Path, image: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as im:
            arr = np.asarray(im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"{folder}: {image.name} is not a readable image ({type(exc).__name__})") from None
    return arr[..., None] if arr.ndim == 2 else arr


def load_examples(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N x H x W x C uint8) and their labels (int64) from an example folder."""
    folder = Path(folder)
    images = _images(folder)
    if not images:
        raise DataError(f"{folder}: no example images ({', '.join(EXAMPLE_SUFFIXES)})")
    ys = [_label(folder, p) for p in images]  # every label first: a missing one fails before any decoding
    xs = [_pixels(folder, p) for p in images]
    odd = next(((p, x.shape) for p, x in zip(images, xs) if x.shape != xs[0].shape), None)
    if odd is not None:
        a, b = (f"{name} is {'x'.join(map(str, s))}" for name, s in ((images[0].name, xs[0].shape), (odd[0].name, odd[1])))
        raise DataError(f"{folder}: the images differ in size ({a}, {b}; H x W x C)")
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def example_set(folder: Path, classes: list[str], shape: tuple[int, int, int] | None = None) -> ImageSet:
    """An example folder as the scan's clean images (float N x C x H x W in [0, 1]),
    labelled with ``classes``; its images must be ``shape`` (C, H, W) when given."""
    x, y = load_examples(folder)
    if int(y.max()) >= len(classes):
        bad = int(y.max())
        raise DataError(f"{folder}: label {bad} is not a class of the data (0..{len(classes) - 1})")
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).float().div_(255.0)
    got = tuple(int(s) for s in xt.shape[1:])
    if shape is not None and got != tuple(shape):
        have, want = "x".join(map(str, got)), "x".join(map(str, shape))
        raise DataError(f"{folder}: the examples are {have} (C x H x W), the scan's data is {want}")
    return ImageSet(xt, torch.from_numpy(y), list(classes))
