"""Small generated stand-ins for datasets that cannot be downloaded in tests.

Every writer puts files in the exact on-disk format that the real dataset uses (the one torchvision's
readers, or our own readers, expect), with random uint8 pixels, and returns the ``root`` to pass as
``SSLDataModule(root=...)``. Sizes are tiny so that the tests stay fast.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---- CIFAR-10 / CIFAR-100: python pickles of dicts, rows of 3072 bytes (R plane, G plane, B plane) ----
def _pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: str | Path, per_batch: int = 8, n_test: int = 10, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` (5 * per_batch train images)."""
    rng, folder = _rng(seed), Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        _pickle(folder / name, {
            "batch_label": f"{name} of 5",
            "labels": rng.integers(0, 10, n).tolist(),
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"img_{name}_{i}.png" for i in range(n)],
        })
    _pickle(folder / "batches.meta", {
        "num_cases_per_batch": per_batch,
        "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
        "num_vis": 3072,
    })
    return Path(root)


def write_cifar100(root: str | Path, n_train: int = 40, n_test: int = 10, seed: int = 0) -> Path:
    """``root/cifar-100-python/{train, test, meta}`` with fine (100) and coarse (20) labels."""
    rng, folder = _rng(seed), Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, n)
        _pickle(folder / name, {
            "filenames": [f"img_{name}_{i}.png" for i in range(n)],
            "batch_label": f"{name} batch 1 of 1",
            "fine_labels": fine.tolist(),
            "coarse_labels": (fine // 5).tolist(),
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        })
    _pickle(folder / "meta", {
        "fine_label_names": [f"fine_{i}" for i in range(100)],
        "coarse_label_names": [f"coarse_{i}" for i in range(20)],
    })
    return Path(root)


# ---- STL-10: raw uint8 binaries, images (N, 3, 96, 96) stored column-major, labels 1..10 ----------------
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def _write_stl_images(path: Path, images: np.ndarray) -> None:
    # torchvision reads reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2): each channel is stored column by column
    path.write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())


def write_stl10(root: str | Path, n_train: int = 20, n_unlabeled: int = 30, n_test: int = 10, seed: int = 0,
                size: int = 96) -> Path:
    """``root/stl10_binary/{train_X, train_y, unlabeled_X, test_X, test_y}.bin``, class_names.txt and
    fold_indices.txt (10 lines of 0-based train indices). Returns ``root``; the images (N, 3, 96, 96)
    are also written as ``root/stl10_arrays.npz`` so tests can check the decoding."""
    rng, folder = _rng(seed), Path(root) / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n, labelled in (("train", n_train, True), ("unlabeled", n_unlabeled, False), ("test", n_test, True)):
        images = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
        _write_stl_images(folder / f"{prefix}_X.bin", images)
        arrays[f"{prefix}_X"] = images
        if labelled:
            labels = rng.integers(1, 11, n, dtype=np.uint8)  # 1-based on disk
            (folder / f"{prefix}_y.bin").write_bytes(labels.tobytes())
            arrays[f"{prefix}_y"] = labels.astype(np.int64) - 1
    (folder / "class_names.txt").write_text("\n".join(STL10_CLASSES) + "\n")
    folds = [" ".join(str(j) for j in range(n_train) if j % 10 != k) for k in range(10)]
    (folder / "fold_indices.txt").write_text("\n".join(folds) + "\n")
    np.savez(Path(root) / "stl10_arrays.npz", **arrays)
    return Path(root)


# ---- Image folders ---------------------------------------------------------------------------------------
FAKE_WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]


def write_image(path: str | Path, size: tuple[int, int] = (40, 32), seed: int = 0, mode: str = "RGB") -> Path:
    """One random image; the format follows the suffix (.jpg, .png, ...). ``size`` is (width, height)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = _rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)
    return path


def _class_folder(folder: Path, classes: list[str], per_class: int, seed: int) -> None:
    sizes = [(40, 32), (32, 48), (56, 40), (36, 36)]  # varying sizes and aspect ratios, as in ImageNet
    for c, name in enumerate(classes):
        for i in range(per_class):
            suffix = (".JPEG", ".png", ".jpg")[i % 3]
            write_image(folder / name / f"{name}_{i}{suffix}", sizes[(c + i) % len(sizes)], seed=seed + 1000 * c + i)


def write_image_folder(root: str | Path, classes: list[str] | None = None, train_per_class: int = 6,
                       val_per_class: int = 2, extra_classes: list[str] = (), seed: int = 0) -> Path:
    """ImageNet layout: ``root/train/<class>/*`` and ``root/val/<class>/*`` (JPEG and PNG files of
    varying sizes). ``extra_classes`` are folders that exist on disk but that a class list may leave out."""
    root = Path(root)
    classes = list(classes or FAKE_WNIDS)
    _class_folder(root / "train", classes + list(extra_classes), train_per_class, seed)
    _class_folder(root / "val", classes + list(extra_classes), val_per_class, seed + 10**6)
    return root


def write_class_list(path: str | Path, classes: list[str]) -> Path:
    """A class-list file: one folder name per line, with a comment and a blank line (both ignored)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# generated class list\n\n" + "\n".join(f"{c}  # class {i}" for i, c in enumerate(classes)) + "\n")
    return path


def write_flat_folder(root: str | Path, n: int = 12, seed: int = 0) -> Path:
    """Unlabelled images directly in ``root`` (no class sub-folders), plus a non-image file to ignore."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_image(root / f"img_{i:03d}{('.jpg', '.png')[i % 2]}", (48, 40) if i % 2 else (40, 52), seed=seed + i)
    (root / "README.txt").write_text("not an image\n")
    return root


def write_corrupt_image(path: str | Path) -> Path:
    """A file with an image suffix whose bytes are not an image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a JPEG file" * 20)
    return path


def write_truncated_jpeg(path: str | Path, keep: float = 0.5, size: tuple[int, int] = (64, 64)) -> Path:
    """A real JPEG cut after ``keep`` of its bytes (the header is intact, the scan data is not)."""
    path = Path(path)
    write_image(path, size, seed=123)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


# ---- Fashion-MNIST: idx files (big-endian header), gzipped as in Debian's dataset-fashion-mnist ---------------
def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_fashion_mnist(root: str | Path, n_train: int = 32, n_test: int = 16, seed: int = 0, gz: bool = True) -> Path:
    """``root/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` with 28x28 images and labels 0..9."""
    rng, root = _rng(seed), Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                            ("labels-idx1", rng.integers(0, 10, n, dtype=np.uint8))):
            data = _idx_bytes(array)
            name = root / f"{prefix}-{kind}-ubyte"
            if gz:
                with gzip.open(str(name) + ".gz", "wb") as f:
                    f.write(data)
            else:
                name.write_bytes(data)
    return root
