"""Data sets: synthetic, npz, image folders (and tar.gz), the decode cache, Fashion-MNIST IDX."""

from __future__ import annotations

import gzip
import re
import struct
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gdm_ray.core.data import (
    DataSpec,
    ImageSet,
    load_fashion_mnist,
    load_imagefolder,
    load_npz,
    load_splits,
    make_synthetic,
)
from gdm_ray.core.errors import ConfigError, DataError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def _rows(s: ImageSet) -> Counter:
    """Multiset of (label, exact image bytes): compares sets of images independent of order."""
    x = s.x.numpy()
    return Counter((int(y), x[i].tobytes()) for i, y in enumerate(s.y.tolist()))


def _assert_images(s: ImageSet) -> None:
    assert s.x.dtype == torch.float32
    assert s.y.dtype == torch.int64
    assert s.x.dim() == 4
    assert float(s.x.min()) >= 0.0 and float(s.x.max()) <= 1.0


# --- synthetic -------------------------------------------------------------------


def test_synthetic_shape_range_dtype(synthetic_splits):
    s = synthetic_splits
    assert (len(s.train), len(s.defense), len(s.eval)) == (1200, 400, 400)
    assert s.shape == (1, 16, 16)
    assert s.classes == ["class0", "class1", "class2", "class3"]
    assert s.name == "synthetic"
    for part in (s.train, s.defense, s.eval):
        _assert_images(part)
        assert part.num_classes == 4
        assert set(part.y.tolist()) == {0, 1, 2, 3}


def test_synthetic_colour_non_square():
    s = load_splits(DataSpec(name="synthetic", samples=300, num_classes=3, image_size=[12, 20], channels=3, seed=4))
    assert s.shape == (3, 12, 20)
    assert s.train.x.shape == (180, 3, 12, 20)
    _assert_images(s.train)


def test_synthetic_deterministic_per_seed():
    a = load_splits(DataSpec(name="synthetic", samples=200, seed=3))
    b = load_splits(DataSpec(name="synthetic", samples=200, seed=3))
    c = load_splits(DataSpec(name="synthetic", samples=200, seed=4))
    for part in ("train", "defense", "eval"):
        assert torch.equal(getattr(a, part).x, getattr(b, part).x)
        assert torch.equal(getattr(a, part).y, getattr(b, part).y)
    assert not torch.equal(a.train.x, c.train.x)
    assert torch.equal(make_synthetic(50, seed=9).x, make_synthetic(50, seed=9).x)
    assert not torch.equal(make_synthetic(50, seed=9).x, make_synthetic(50, seed=10).x)


def test_synthetic_splits_are_a_disjoint_partition_of_the_pool(synthetic_spec, synthetic_splits):
    pool = make_synthetic(2000, 4, (16, 16), 1, 0)
    pool_rows = _rows(pool)
    assert max(pool_rows.values()) == 1, "synthetic images are all distinct"
    parts = [_rows(synthetic_splits.train), _rows(synthetic_splits.defense), _rows(synthetic_splits.eval)]
    # disjoint: no image in two splits
    assert not (set(parts[0]) & set(parts[1]))
    assert not (set(parts[0]) & set(parts[2]))
    assert not (set(parts[1]) & set(parts[2]))
    # and together exactly the pool (labels travel with their images)
    assert parts[0] + parts[1] + parts[2] == pool_rows


def test_fractions_set_split_sizes():
    a = load_splits(DataSpec(name="synthetic", samples=200, seed=0))
    b = load_splits(DataSpec(name="synthetic", samples=200, seed=0, fractions=[0.5, 0.25, 0.25]))
    assert (len(b.train), len(b.defense), len(b.eval)) == (100, 50, 50)
    assert len(a.train) == 120


def test_limits_cap_each_split():
    s = load_splits(DataSpec(name="synthetic", samples=400, limit_train=10, limit_defense=7, limit_eval=5))
    assert (len(s.train), len(s.defense), len(s.eval)) == (10, 7, 5)
    full = load_splits(DataSpec(name="synthetic", samples=400))
    assert set(_rows(s.train)) <= set(_rows(full.train))
    assert torch.equal(s.defense.x, full.defense.x[:7])


def test_limit_train_samples_every_class_of_a_class_sorted_train_folder(tmp_path):
    """A train/ folder is read class by class: a prefix of it would hold the first classes only
    (limit_train=20000 on CIFAR-10 gave classes 0-3 and a 36%-accurate model)."""
    root = tmp_path / "sorted"
    _write_tree(root / "train", classes=("a", "b", "c", "d"), per_class=10)
    _write_tree(root / "test", classes=("a", "b", "c", "d"), per_class=4, start=100)
    spec = dict(name="imagefolder", path=str(root), cache_dir=str(tmp_path / "cache"), limit_train=12)
    s = load_splits(DataSpec(**spec))
    assert len(s.train) == 12 and set(s.train.y.tolist()) == {0, 1, 2, 3}
    assert torch.equal(load_splits(DataSpec(**spec)).train.x, s.train.x)  # seeded: the same subset every time


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"name": "mnist"}, "data.name='mnist'"),
        ({"defense_fraction": 1.0}, "data.defense_fraction=1.0"),
        ({"fractions": [0.8, 0.0, 0.2]}, "data.fractions=[0.8, 0.0, 0.2]"),
        ({"fractions": [0.6, 0.3, 0.3]}, "data.fractions=[0.6, 0.3, 0.3]"),
        ({"limit_eval": -1}, "data.limit_eval=-1"),
    ],
)
def test_bad_data_spec(kwargs, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        DataSpec(**kwargs)


def test_synthetic_bad_sizes():
    with pytest.raises(ConfigError, match="num_classes >= 2"):
        load_splits(DataSpec(name="synthetic", num_classes=1))
    with pytest.raises(DataError, match="too small"):
        load_splits(DataSpec(name="synthetic", samples=2, num_classes=2))


# --- npz -------------------------------------------------------------------------


def test_npz_uint8_grey(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(10, 5, 7), dtype=np.uint8)
    y = np.arange(10) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    s = load_npz(tmp_path / "d.npz")
    _assert_images(s)
    assert s.x.shape == (10, 1, 5, 7)
    torch.testing.assert_close(s.x[:, 0], torch.from_numpy(x).float() / 255)
    assert s.y.tolist() == y.tolist()
    assert s.classes == ["0", "1", "2"]


def test_npz_uint8_channels_last(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(6, 4, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 0, 1, 0, 1], dtype=np.int32), classes=np.array(["cat", "dog"]))
    s = load_npz(tmp_path / "d.npz")
    assert s.x.shape == (6, 3, 4, 5)
    # x[n, h, w, c] lands at [n, c, h, w]
    assert float(s.x[2, 1, 3, 4]) == pytest.approx(x[2, 3, 4, 1] / 255)
    torch.testing.assert_close(s.x, torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
    assert s.classes == ["cat", "dog"]
    assert s.y.dtype == torch.int64


def test_npz_float_nchw(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.random((8, 2, 3, 3)).astype(np.float64)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(8) % 4)
    s = load_npz(tmp_path / "d.npz")
    _assert_images(s)
    assert s.x.shape == (8, 2, 3, 3)
    torch.testing.assert_close(s.x, torch.from_numpy(x).float())
    assert s.num_classes == 4


def test_npz_through_load_splits(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, size=(50, 6, 6), dtype=np.uint8)
    x[:, 0, 0] = np.arange(50)  # make every image distinct
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(50) % 2)
    s = load_splits(DataSpec(name="npz", path=str(tmp_path / "d.npz"), fractions=[0.6, 0.2, 0.2]))
    assert (len(s.train), len(s.defense), len(s.eval)) == (30, 10, 10)
    assert not (set(_rows(s.defense)) & set(_rows(s.eval)))
    assert _rows(s.train) + _rows(s.defense) + _rows(s.eval) == _rows(load_npz(tmp_path / "d.npz"))


def _npz_error(path: Path, needle: str) -> None:
    with pytest.raises(DataError) as info:
        load_npz(path)
    msg = str(info.value)
    assert str(path) in msg
    assert needle in msg
    assert "\n" not in msg


def test_npz_errors(tmp_path):
    y = np.arange(4) % 2
    np.savez(tmp_path / "int32.npz", x=np.zeros((4, 3, 3), dtype=np.int32), y=y)
    _npz_error(tmp_path / "int32.npz", "int32")
    np.savez(tmp_path / "range.npz", x=np.full((4, 1, 3, 3), 1.5, dtype=np.float32), y=y)
    _npz_error(tmp_path / "range.npz", "[0, 1]")
    np.savez(tmp_path / "neg.npz", x=np.full((4, 1, 3, 3), -0.1, dtype=np.float32), y=y)
    _npz_error(tmp_path / "neg.npz", "[0, 1]")
    nan = np.zeros((4, 1, 3, 3), dtype=np.float32)
    nan[0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=nan, y=y)
    _npz_error(tmp_path / "nan.npz", "[0, 1]")
    np.savez(tmp_path / "noy.npz", x=np.zeros((4, 3, 3), dtype=np.uint8))
    _npz_error(tmp_path / "noy.npz", "'y'")
    np.savez(tmp_path / "len.npz", x=np.zeros((5, 3, 3), dtype=np.uint8), y=y)
    _npz_error(tmp_path / "len.npz", "5 images but 4 labels")
    np.savez(tmp_path / "fy.npz", x=np.zeros((4, 3, 3), dtype=np.uint8), y=y.astype(np.float32))
    _npz_error(tmp_path / "fy.npz", "float32")
    np.savez(tmp_path / "negy.npz", x=np.zeros((4, 3, 3), dtype=np.uint8), y=y - 1)
    _npz_error(tmp_path / "negy.npz", "-1")
    np.savez(tmp_path / "5d.npz", x=np.zeros((4, 1, 3, 3, 1), dtype=np.uint8), y=y)
    _npz_error(tmp_path / "5d.npz", "(4, 1, 3, 3, 1)")
    np.savez(tmp_path / "float3d.npz", x=np.zeros((4, 3, 3), dtype=np.float32), y=y)
    _npz_error(tmp_path / "float3d.npz", "N x C x H x W")
    np.savez(tmp_path / "obj.npz", x=np.zeros((4, 3, 3), dtype=np.uint8), y=np.array([0, 1, 0, 1], dtype=object))
    _npz_error(tmp_path / "obj.npz", "not a readable npz")


def test_npz_not_an_npz(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("x,y\n1,2\n")
    _npz_error(text, "not a readable npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04" + bytes(range(200)))
    _npz_error(junk, "not a readable npz")
    npy = tmp_path / "array.npy"
    np.save(npy, np.zeros((3, 4, 4), dtype=np.uint8))
    _npz_error(npy, "npz")
    good = tmp_path / "good.npz"
    np.savez_compressed(good, x=np.zeros((30, 8, 8), dtype=np.uint8), y=np.arange(30) % 2)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # an interrupted download
    _npz_error(truncated, "not a readable npz")
    _npz_error(tmp_path / "missing.npz", "not a readable npz")


def test_npz_needs_a_path():
    with pytest.raises(ConfigError, match="data.path"):
        load_splits(DataSpec(name="npz"))


# --- image folders ---------------------------------------------------------------


def _img(value: int, label: int, mode: str, hw=(6, 8)) -> Image.Image:
    """A small image whose pixels encode (value, label) so each decoded image is identifiable."""
    h, w = hw
    arr = np.full((h, w, 3), value, dtype=np.uint8)
    arr[0, 0] = [label * 40, 7, 200]
    arr[h - 1, w - 1, 2] = 255 - value
    img = Image.fromarray(arr, mode="RGB")
    return img.convert("L") if mode == "L" else img


def _write_tree(root: Path, classes=("cat", "dog", "eel"), per_class=3, mode="RGB", start=0) -> dict[str, list[np.ndarray]]:
    """class/img.png; returns the expected uint8 arrays (C x H x W) per class."""
    expected: dict[str, list[np.ndarray]] = {}
    for k, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = _img(start + 10 * i + k, k, mode)
            img.save(root / cls / f"{i:03d}.png")
            arr = np.asarray(img)
            expected.setdefault(cls, []).append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    return expected


def _expected_rows(expected: dict[str, list[np.ndarray]]) -> Counter:
    classes = sorted(expected)
    rows: Counter = Counter()
    for cls, arrays in expected.items():
        for a in arrays:
            rows[(classes.index(cls), (torch.from_numpy(np.array(a)).float() / 255).numpy().tobytes())] += 1
    return rows


def test_imagefolder_flat(tmp_path):
    root = tmp_path / "flat"
    expected = _write_tree(root)
    parts = load_imagefolder(root, cache_dir=str(tmp_path / "cache"))
    assert set(parts) == {"all"}
    s = parts["all"]
    _assert_images(s)
    assert s.x.shape == (9, 3, 6, 8)
    assert s.classes == ["cat", "dog", "eel"]
    assert _rows(s) == _expected_rows(expected)


def test_imagefolder_grey_images_have_one_channel(tmp_path):
    root = tmp_path / "grey"
    expected = _write_tree(root, classes=("a", "b"), mode="L")
    s = load_imagefolder(root, cache_dir=str(tmp_path / "cache"))["all"]
    assert s.x.shape == (6, 1, 6, 8)
    assert _rows(s) == _expected_rows(expected)


def _split_tree(root: Path) -> tuple[dict, dict]:
    train = _write_tree(root / "train", classes=("ant", "bee"), per_class=4, start=0)
    test = _write_tree(root / "test", classes=("ant", "bee"), per_class=5, start=100)
    return train, test


def test_imagefolder_train_test(tmp_path):
    root = tmp_path / "tree"
    train, test = _split_tree(root)
    parts = load_imagefolder(root, cache_dir=str(tmp_path / "cache"))
    assert set(parts) == {"train", "test"}
    assert _rows(parts["train"]) == _expected_rows(train)
    assert _rows(parts["test"]) == _expected_rows(test)
    assert parts["train"].classes == ["ant", "bee"]

    s = load_splits(DataSpec(name="imagefolder", path=str(root), cache_dir=str(tmp_path / "cache"), seed=1))
    assert len(s.train) == 8 and len(s.defense) + len(s.eval) == 10
    assert len(s.defense) == 5  # defense_fraction 0.5 of the test part
    assert not (set(_rows(s.defense)) & set(_rows(s.eval)))
    assert _rows(s.defense) + _rows(s.eval) == _expected_rows(test)
    # cifar10 with train/ and test/ loads the same way
    c = load_splits(DataSpec(name="cifar10", path=str(root), cache_dir=str(tmp_path / "cache"), seed=1))
    assert torch.equal(c.eval.x, s.eval.x)


def test_imagefolder_flat_through_load_splits(tmp_path):
    root = tmp_path / "flat"
    expected = _write_tree(root, per_class=5)
    s = load_splits(DataSpec(name="imagefolder", path=str(root), cache_dir=str(tmp_path / "cache")))
    assert (len(s.train), len(s.defense), len(s.eval)) == (9, 3, 3)
    assert _rows(s.train) + _rows(s.defense) + _rows(s.eval) == _expected_rows(expected)
    with pytest.raises(DataError, match="train/ and test/"):
        load_splits(DataSpec(name="cifar10", path=str(root), cache_dir=str(tmp_path / "cache")))


def _tar(src: Path, dest: Path, arcname: str) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(src, arcname=arcname)
    return dest


def test_imagefolder_tar_gz(tmp_path):
    root = tmp_path / "tree"
    train, test = _split_tree(root)
    archive = _tar(root, tmp_path / "tree.tar.gz", arcname="cifar-like")  # with a common top folder
    parts = load_imagefolder(archive, cache_dir=str(tmp_path / "cache"))
    assert set(parts) == {"train", "test"}
    assert _rows(parts["train"]) == _expected_rows(train)
    assert _rows(parts["test"]) == _expected_rows(test)

    flat = tmp_path / "flat"
    expected = _write_tree(flat)
    flat_archive = _tar(flat, tmp_path / "flat.tar.gz", arcname=".")
    s = load_imagefolder(flat_archive, cache_dir=str(tmp_path / "cache"))["all"]
    assert s.classes == ["cat", "dog", "eel"]
    assert _rows(s) == _expected_rows(expected)


def test_imagefolder_cache(tmp_path):
    root = tmp_path / "tree"
    _split_tree(root)
    cache = tmp_path / "cache"
    first = load_imagefolder(root, cache_dir=str(cache))
    files = list(cache.glob("imagefolder-*.npz"))
    assert len(files) == 1
    assert not list(cache.glob("*.tmp"))
    second = load_imagefolder(root, cache_dir=str(cache))
    for part in ("train", "test"):
        assert torch.equal(first[part].x, second[part].x)
        assert torch.equal(first[part].y, second[part].y)
        assert first[part].classes == second[part].classes
    # a damaged cache is rebuilt, not trusted
    files[0].write_bytes(b"not an npz")
    third = load_imagefolder(root, cache_dir=str(cache))
    assert torch.equal(first["test"].x, third["test"].x)


def test_imagefolder_cache_sees_new_images_in_class_folders(tmp_path):
    root = tmp_path / "flat"
    _write_tree(root, classes=("a", "b"), per_class=2)
    cache = str(tmp_path / "cache")
    assert len(load_imagefolder(root, cache_dir=cache)["all"]) == 4
    _img(250, 0, "RGB").save(root / "a" / "new.png")  # changes a/ but not the root folder's mtime
    assert len(load_imagefolder(root, cache_dir=cache)["all"]) == 5


def test_imagefolder_not_images(tmp_path):
    root = tmp_path / "texts"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        (root / cls / "readme.txt").write_text("hello\n")
    with pytest.raises(DataError, match=re.escape(f"data.path={root}: no images found")):
        load_imagefolder(root, cache_dir=str(tmp_path / "cache"))


def test_imagefolder_errors(tmp_path):
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError, match="does not exist"):
        load_imagefolder(tmp_path / "nowhere", cache_dir=cache)

    fake = tmp_path / "fake"
    _write_tree(fake, classes=("a",), per_class=1)
    (fake / "a" / "broken.png").write_text("not a png")
    with pytest.raises(DataError, match=re.escape("broken.png is not a readable image")):
        load_imagefolder(fake, cache_dir=cache)

    sizes = tmp_path / "sizes"
    _write_tree(sizes, classes=("a",), per_class=1)
    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(sizes / "a" / "odd.png")
    with pytest.raises(DataError, match="5x5"):
        load_imagefolder(sizes, cache_dir=cache)

    bad_tar = tmp_path / "bad.tar.gz"
    bad_tar.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(DataError, match=re.escape(str(bad_tar))):
        load_imagefolder(bad_tar, cache_dir=cache)

    with pytest.raises(ConfigError, match="data.path"):
        load_splits(DataSpec(name="imagefolder"))


# --- Fashion-MNIST (IDX) ---------------------------------------------------------


def _idx(arr: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.astype(np.uint8).tobytes()


def _write_fake_fmnist(root: Path, n_train=20, n_test=10, hw=(5, 7), gz=True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for part, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, *hw), dtype=np.uint8)
        x[:, 0, 0] = np.arange(n)  # distinct images
        y = (np.arange(n) % 10).astype(np.uint8)
        for stem, arr in ((f"{part}-images-idx3-ubyte", x), (f"{part}-labels-idx1-ubyte", y)):
            data = _idx(arr)
            if gz:
                (root / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (root / stem).write_bytes(data)
        out[part] = (x, y)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_fake_idx_parses(tmp_path, gz):
    root = tmp_path / "fm"
    arrays = _write_fake_fmnist(root, gz=gz)
    train = load_fashion_mnist(root, "train")
    x, y = arrays["train"]
    assert train.x.shape == (20, 1, 5, 7)
    _assert_images(train)
    torch.testing.assert_close(train.x[:, 0], torch.from_numpy(x).float() / 255)
    assert train.y.tolist() == y.tolist()
    assert train.num_classes == 10 and train.classes[0] == "T-shirt/top"

    s = load_splits(DataSpec(name="fashion_mnist", path=str(root), seed=2))
    assert len(s.train) == 20 and len(s.defense) == 5 and len(s.eval) == 5
    assert s.shape == (1, 5, 7)
    assert not (set(_rows(s.defense)) & set(_rows(s.eval)))
    assert _rows(s.defense) + _rows(s.eval) == _rows(load_fashion_mnist(root, "t10k"))


def _corrupt(root: Path, stem: str, data: bytes, gz: bool = True) -> Path:
    path = root / (f"{stem}.gz" if gz else stem)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize(
    ("data", "gz", "needle"),
    [
        (b"\x00\x00\x0d\x03" + b"\x00" * 20, True, "not an unsigned-byte IDX"),  # float IDX
        (b"\x12\x34\x08\x03" + b"\x00" * 20, True, "not an unsigned-byte IDX"),  # bad magic
        (b"\x00\x00\x08\x03\x00\x00", True, "truncated IDX header"),  # header cut short
        (b"\x00\x00", True, "too short"),
        (_idx(np.zeros((20, 5, 7), np.uint8))[:-10], True, "IDX header says"),  # data cut short
        (b"this is not gzip at all", "raw-in-gz", "cannot read IDX"),
        (gzip.compress(_idx(np.zeros((20, 5, 7), np.uint8)))[:-30], "raw-in-gz", "cannot read IDX"),  # truncated gzip
    ],
)
def test_corrupt_idx(tmp_path, data, gz, needle):
    root = tmp_path / "fm"
    _write_fake_fmnist(root)
    if gz == "raw-in-gz":
        path = root / "train-images-idx3-ubyte.gz"
        path.write_bytes(data)
    else:
        path = _corrupt(root, "train-images-idx3-ubyte", data, gz)
    with pytest.raises(DataError) as info:
        load_splits(DataSpec(name="fashion_mnist", path=str(root)))
    assert needle in str(info.value)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_idx_missing_and_mismatched(tmp_path):
    root = tmp_path / "fm"
    _write_fake_fmnist(root)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_splits(DataSpec(name="fashion_mnist", path=str(root)))

    root2 = tmp_path / "fm2"
    _write_fake_fmnist(root2)
    _corrupt(root2, "train-labels-idx1-ubyte", _idx(np.zeros(19, np.uint8)))
    with pytest.raises(DataError, match="do not match"):
        load_fashion_mnist(root2, "train")

    root3 = tmp_path / "fm3"
    _write_fake_fmnist(root3, n_train=12, hw=(5, 7))
    _corrupt(root3, "t10k-images-idx3-ubyte", _idx(np.zeros((10, 4, 4), np.uint8)))
    with pytest.raises(DataError, match=re.escape("(1, 5, 7)")):
        load_splits(DataSpec(name="fashion_mnist", path=str(root3)))


@pytest.mark.skipif(
    not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason=f"Fashion-MNIST not installed at {FMNIST_DIR} (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist():
    s = load_splits(DataSpec(name="fashion_mnist"))
    assert s.train.x.shape == (60000, 1, 28, 28)
    _assert_images(s.train)
    assert len(s.defense) + len(s.eval) == 10000
    assert len(s.defense) == 5000
    assert s.classes == s.train.classes and len(s.classes) == 10
    assert set(s.train.y.tolist()) == set(range(10))
    assert set(s.eval.y.tolist()) == set(range(10))
    # defense and eval partition the official test set (Counter copes with duplicate images)
    test = load_fashion_mnist(FMNIST_DIR, "t10k")
    d, e = _rows(s.defense), _rows(s.eval)
    assert d + e == _rows(test)
    dup = {k for k, v in _rows(test).items() if v > 1}
    assert not ((set(d) & set(e)) - dup)
