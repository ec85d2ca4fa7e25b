"""SaflexCollate: run any per-sample upstream augmentation inside the collate and tag every sample.

A :class:`torch.utils.data.DataLoader` hands the collate a list of untransformed samples ``(input, label)``
(or ``(input, label, index)``). :class:`SaflexCollate` emits, per sample, the clean input and/or augmented
copies made by the upstream transform, stacks them, and returns the usual 2-tuple ``(inputs, target)`` where
``target`` is a :class:`saflex_data.batch.SaflexTarget` recording, per row, the label, whether the row is
augmented, the source index and the id of the upstream op that made it.

Randomness never comes from global NumPy state. Each process (main or worker) owns a ``torch.Generator``
seeded from ``torch.initial_seed()`` (which the DataLoader sets per worker from its own ``generator``) or from
the ``seed`` argument; every upstream call runs under a forked torch/``random`` state seeded from it. The same
DataLoader seed and number of workers therefore give the same batches and tags. For batches that do not even
depend on the number of workers (decisions made in the main process), use
:class:`saflex_data.sampler.SaflexBatchSampler`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate, get_worker_info

from ._describe import describe as _describe
from ._seeds import MASK63, draw_seed, mix_seed, seeded
from .batch import SaflexTarget

__all__ = [
    "SaflexCollate",
    "SampleTransform",
    "CallableTransform",
    "TaggedSample",
    "IndexedDataset",
    "seeded",
    "mix_seed",
]

OutputKind = Literal["tensor", "uint8"]
TargetFormat = Literal["saflex", "labels"]


@runtime_checkable
class SampleTransform(Protocol):
    """A per-sample augmentation that reports what it did (implemented by the adapters).

    Attributes:
        op_names: Names of the ops it can report; ``augment`` returns an index into it.
    """

    op_names: tuple[str, ...]

    def clean(self, sample: Any) -> Any:
        """The fixed, non-random part of the pipeline only (e.g. ``Normalize`` + ``ToTensorV2``)."""
        ...

    def augment(self, sample: Any, generator: torch.Generator) -> tuple[Any, int]:
        """Augment one sample with randomness drawn from ``generator``.

        Returns:
            ``(output, op)``: ``op`` indexes ``op_names``, or is ``-1`` when nothing random was applied (then
            ``output`` must equal ``clean(sample)``).
        """
        ...


class CallableTransform:
    """Wrap any callable ``sample -> sample`` as a :class:`SampleTransform` that always applies.

    The callable's global-RNG draws (torch CPU and ``random``) are seeded from the collate's generator.

    Args:
        fn: The per-sample transform.
        name: Op name used in statistics (defaults to the class or function name of ``fn``).
    """

    def __init__(self, fn: Callable[[Any], Any], name: str | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, but got an object of type {type(fn).__name__}.")
        self.fn = fn
        self.op_names = (name or _callable_name(fn),)

    def clean(self, sample: Any) -> Any:
        return sample

    def augment(self, sample: Any, generator: torch.Generator) -> tuple[Any, int]:
        with seeded(draw_seed(generator)):
            return self.fn(sample), 0

    def __repr__(self) -> str:
        return f"CallableTransform({self.fn!r})"


class TaggedSample(NamedTuple):
    """One sample whose augmentation was already decided (by a dataset wrapper); op ``-1`` means clean."""

    input: Any
    label: Any
    index: int
    op: int


TaggedSample.__new__.__module__ = __name__  # the generated constructor's annotations resolve in this module (API docs)


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so items are ``(input, label, index)``; the collate then records dataset indices.

    Example:
        >>> ds = IndexedDataset([(torch.zeros(2), 1)])
        >>> ds[0][2]
        0
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        item = self.dataset[index]
        return item[0], item[1], index


def as_sample_transform(transform: Any) -> SampleTransform:
    """Return ``transform`` if it already reports tags, else wrap it in :class:`CallableTransform`."""
    if isinstance(transform, SampleTransform):
        return transform
    return CallableTransform(transform)


class AugmentPipeline:
    """``pre -> (clean | one of the transforms) -> post`` with op ids flattened over the transforms.

    Shared by :class:`SaflexCollate`, :class:`saflex_data.sampler.SaflexDataset` and the offline wrapper.

    Args:
        transform: One transform, or a sequence of them (one is picked per augmented copy).
        pre_transform: Fixed callable applied first to every sample (e.g. a deterministic resize).
        post_transform: Fixed callable applied last to every sample (e.g. ``ToImage`` + ``ToDtype``).
        weights: Relative probabilities of picking each transform (uniform by default).
    """

    def __init__(
        self,
        transform: Any | Sequence[Any] | None,
        *,
        pre_transform: Callable[[Any], Any] | None = None,
        post_transform: Callable[[Any], Any] | None = None,
        weights: Sequence[float] | None = None,
        owner: str = "SaflexCollate",
    ) -> None:
        if transform is None:
            transforms: list[SampleTransform] = []
        elif isinstance(transform, (list, tuple)):
            if not transform:
                raise ValueError(f"{owner}: transform must be a callable or a non-empty sequence, but got [].")
            transforms = [as_sample_transform(t) for t in transform]
        else:
            transforms = [as_sample_transform(transform)]
        for name, fn in (("pre_transform", pre_transform), ("post_transform", post_transform)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{owner}: {name} must be callable or None, but got {type(fn).__name__}.")
        if weights is not None:
            if len(weights) != len(transforms) or any(not w >= 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(
                    f"{owner}: weights must be {len(transforms)} non-negative numbers with a positive sum, "
                    f"but got {list(weights)}."
                )
        self.transforms = transforms
        self.pre_transform = pre_transform
        self.post_transform = post_transform
        self.weights = None if weights is None else torch.tensor([float(w) for w in weights], dtype=torch.float64)
        self.owner = owner
        names: list[str] = []
        self.offsets: list[int] = []
        for t in transforms:
            self.offsets.append(len(names))
            names.extend(str(n) for n in t.op_names)
        self.op_names: tuple[str, ...] = tuple(names)

    @property
    def has_transform(self) -> bool:
        return bool(self.transforms)

    def describe(self) -> str:
        if not self.transforms:
            return "None"
        return ", ".join(
            type(t).__name__ if not isinstance(t, CallableTransform) else t.op_names[0] for t in self.transforms
        )

    def clean(self, sample: Any) -> Any:
        if self.pre_transform is not None:
            sample = self.pre_transform(sample)
        if self.transforms:
            sample = self.transforms[0].clean(sample)
        if self.post_transform is not None:
            sample = self.post_transform(sample)
        return sample

    def augment(self, sample: Any, generator: torch.Generator) -> tuple[Any, int]:
        """Augment one sample; returns ``(output, op)`` with ``op`` a global id or ``-1`` (nothing applied)."""
        if not self.transforms:
            return self.clean(sample), -1
        if len(self.transforms) == 1:
            k = 0
        elif self.weights is None:
            k = int(torch.randint(len(self.transforms), (), generator=generator))
        else:
            k = int(torch.multinomial(self.weights, 1, generator=generator))
        if self.pre_transform is not None:
            sample = self.pre_transform(sample)
        out, op = self.transforms[k].augment(sample, generator)
        if not isinstance(op, int) or op < -1 or op >= len(self.transforms[k].op_names):
            raise ValueError(
                f"{self.owner}: transform {type(self.transforms[k]).__name__}.augment must return (output, op) with "
                f"op in [-1, {len(self.transforms[k].op_names)}), but got op={op!r}."
            )
        if self.post_transform is not None:
            out = self.post_transform(out)
        return out, (self.offsets[k] + op if op >= 0 else -1)


class SaflexCollate:
    """Collate function that augments with any per-sample upstream transform and tags every row.

    Per sample it emits either the clean input plus ``num_copies`` augmented copies (copies mode, the default),
    or, with ``p``, one row that is augmented with probability ``p`` (in-place mode). Rows are laid out as
    ``[clean; copy_1; ...; copy_n]`` (timm's ``--aug-splits`` order), so ``SaflexLoss(num_splits=...)`` also works
    with ``target_format="labels"``.

    The target's ``index`` is the dataset index when samples are ``(input, label, index)`` (wrap the dataset in
    :class:`IndexedDataset`), else the sample's position in the incoming batch; either way a clean row and its
    copies share it. ``op`` is ``-1`` for clean rows, else an index into ``op_names``.

    Args:
        transform: The random per-sample augmentation: a callable, an adapter implementing
            :class:`SampleTransform` (e.g. ``TaggedRandomApply``, ``AlbumentationsTransform``), or a sequence of
            them (one picked per augmented copy; its position is the op id). ``None`` gives clean copies only
            (useful with ``batch_transform``).
        pre_transform: Fixed callable applied first to every sample (clean and augmented).
        post_transform: Fixed callable applied last to every sample, e.g.
            ``v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])``.
        num_copies: Augmented copies per sample in copies mode (default 1).
        keep_clean: In copies mode, also emit the clean sample (default ``True``).
        p: Probability of augmenting each sample in place; selects in-place mode (no clean copy).
        weights: Relative probabilities of the transforms when several are given.
        batch_transform: Batch-level op applied after stacking, ``(inputs, SaflexTarget) -> (inputs, SaflexTarget)``,
            e.g. :class:`saflex_data.mixing.MixUp`. In copies mode with ``keep_clean`` it only sees the copies.
        output: ``"tensor"`` stacks tensors/arrays as they are (checking that every row has the same shape and
            dtype; structured inputs such as dicts or tuples go through ``default_collate``); ``"uint8"`` builds
            a uint8 NCHW tensor from uint8 CHW tensors, CHW arrays or PIL images, like
            ``timm.data.loader.fast_collate`` (for timm's prefetcher).
        target_format: ``"saflex"`` returns a :class:`saflex_data.batch.SaflexTarget`; ``"labels"`` returns
            only the label tensor (e.g. for torchvision's reference ``utils.accuracy``).
        seed: Optional seed; by default each process seeds from ``torch.initial_seed()``.
        op_names: Names of the op ids of pre-tagged samples (from :class:`saflex_data.sampler.SaflexDataset`
            or :class:`saflex_data.offline.OfflineAugmentedDataset`); ignored otherwise.

    Example:
        >>> collate = SaflexCollate(lambda x: x.flip(-1), num_copies=1)
        >>> x, target = collate([(torch.arange(3.0), 0), (torch.arange(3.0) + 3, 1)])
        >>> x.shape, target.is_augmented.tolist(), target.index.tolist()
        (torch.Size([4, 3]), [False, False, True, True], [0, 1, 0, 1])
    """

    def __init__(
        self,
        transform: Any | Sequence[Any] | None = None,
        *,
        pre_transform: Callable[[Any], Any] | None = None,
        post_transform: Callable[[Any], Any] | None = None,
        num_copies: int | None = None,
        keep_clean: bool = True,
        p: float | None = None,
        weights: Sequence[float] | None = None,
        batch_transform: Callable[[Tensor, SaflexTarget], tuple[Tensor, SaflexTarget]] | None = None,
        output: OutputKind = "tensor",
        target_format: TargetFormat = "saflex",
        seed: int | None = None,
        op_names: Sequence[str] | None = None,
    ) -> None:
        if p is not None and num_copies is not None:
            raise ValueError(
                f"SaflexCollate: pass either num_copies (copies mode) or p (in-place mode), but got "
                f"num_copies={num_copies} and p={p}."
            )
        if p is not None and not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
            raise ValueError(f"SaflexCollate: p must be a probability in [0, 1], but got {p!r}.")
        if num_copies is None and p is None:
            num_copies = 1
        if num_copies is not None and (not isinstance(num_copies, int) or num_copies < 0):
            raise ValueError(f"SaflexCollate: num_copies must be a non-negative int, but got {num_copies!r}.")
        if num_copies == 0 and not keep_clean:
            raise ValueError("SaflexCollate: num_copies=0 with keep_clean=False would emit no rows.")
        if output not in ("tensor", "uint8"):
            raise ValueError(f"SaflexCollate: output must be 'tensor' or 'uint8', but got {output!r}.")
        if target_format not in ("saflex", "labels"):
            raise ValueError(f"SaflexCollate: target_format must be 'saflex' or 'labels', but got {target_format!r}.")
        if batch_transform is not None and not callable(batch_transform):
            raise TypeError(
                f"SaflexCollate: batch_transform must be callable or None, but got {type(batch_transform).__name__}."
            )
        self.pipeline = AugmentPipeline(
            transform, pre_transform=pre_transform, post_transform=post_transform, weights=weights
        )
        self.num_copies = num_copies
        self.keep_clean = keep_clean
        self.p = p
        self.batch_transform = batch_transform
        self.output = output
        self.target_format = target_format
        self.seed = seed
        self.name = f"SaflexCollate(transform={self.pipeline.describe()})"
        base = tuple(op_names) if (op_names is not None and not self.pipeline.has_transform) else self.pipeline.op_names
        extra = tuple(getattr(batch_transform, "op_names", ()) or ())
        self.op_names: tuple[str, ...] = base + tuple(n for n in extra if n not in base)
        self._generator: torch.Generator | None = None
        self._generator_key: tuple[Any, ...] | None = None

    # The per-process generator must not travel to workers (fork would give every worker the same state).
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_generator"] = None
        state["_generator_key"] = None
        return state

    def generator(self) -> torch.Generator:
        """This process's generator, (re)seeded when the collate first runs in a new process or worker."""
        info = get_worker_info()
        key = (os.getpid(), None if info is None else (info.id, info.seed))
        if self._generator is None or self._generator_key != key:
            process_seed = torch.initial_seed() if info is None else info.seed
            seed = (
                process_seed if self.seed is None else (self.seed if info is None else mix_seed(self.seed, info.seed))
            )
            self._generator = torch.Generator().manual_seed(seed & MASK63)
            self._generator_key = key
        return self._generator

    def __call__(self, batch: Sequence[Any]) -> tuple[Any, SaflexTarget | Tensor]:
        if not isinstance(batch, (list, tuple)) or len(batch) == 0:
            raise ValueError(f"{self.name}: batch must be a non-empty list of samples, but got {batch!r:.80}.")
        rows, block = self._rows(batch)
        inputs = self._stack_inputs(rows)
        target = SaflexTarget(
            self._stack_labels(rows),
            torch.tensor([r[3] >= 0 for r in rows], dtype=torch.bool),
            torch.tensor([r[2] for r in rows], dtype=torch.long),
            torch.tensor([r[3] for r in rows], dtype=torch.long),
            self.op_names,
        )
        if self.batch_transform is not None:
            if not isinstance(inputs, Tensor):
                raise TypeError(
                    f"{self.name}: batch_transform needs tensor inputs, but the batch is {_describe(inputs)}."
                )
            inputs, target = self._apply_batch_transform(inputs, target, block)
        if self.target_format == "labels":
            return inputs, target.labels
        return inputs, target

    def __repr__(self) -> str:
        mode = f"p={self.p}" if self.p is not None else f"num_copies={self.num_copies}, keep_clean={self.keep_clean}"
        return (
            f"SaflexCollate(transform={self.pipeline.describe()}, {mode}, output={self.output!r}, "
            f"target_format={self.target_format!r}, op_names={self.op_names})"
        )

    # ------------------------------------------------------------------------------------------------------
    def _rows(self, batch: Sequence[Any]) -> tuple[list[tuple[Any, Any, int, int]], int]:
        """Return rows ``(input, label, index, op)`` and the first row the batch transform may touch."""
        tagged = [isinstance(item, TaggedSample) for item in batch]
        if any(tagged):
            if not all(tagged):
                raise TypeError(f"{self.name}: a batch mixes pre-tagged (TaggedSample) and plain samples.")
            if self.pipeline.has_transform:
                raise ValueError(
                    f"{self.name}: got pre-tagged samples (from SaflexDataset or OfflineAugmentedDataset) and a "
                    "transform; pass the transform to only one of them."
                )
            return [(s.input, s.label, int(s.index), int(s.op)) for s in batch], 0
        samples = [self._split_item(i, item) for i, item in enumerate(batch)]
        gen = self.generator()
        if self.p is not None:
            rows = []
            for x, y, idx in samples:
                if self.p > 0 and float(torch.rand((), generator=gen)) < self.p:
                    out, op = self.pipeline.augment(x, gen)
                    rows.append((out, y, idx, op))
                else:
                    rows.append((self.pipeline.clean(x), y, idx, -1))
            return rows, 0
        rows = []
        if self.keep_clean:
            rows.extend((self.pipeline.clean(x), y, idx, -1) for x, y, idx in samples)
        for _ in range(self.num_copies or 0):
            for x, y, idx in samples:
                out, op = self.pipeline.augment(x, gen) if self.pipeline.has_transform else (self.pipeline.clean(x), -1)
                rows.append((out, y, idx, op))
        return rows, (len(samples) if self.keep_clean else 0)

    def _split_item(self, position: int, item: Any) -> tuple[Any, Any, int]:
        if isinstance(item, (tuple, list)) and len(item) in (2, 3):
            index = item[2] if len(item) == 3 else position
            return item[0], item[1], _as_index(index, position, self.name)
        raise TypeError(
            f"{self.name}: each sample must be (input, label) or (input, label, index), but sample {position} is "
            f"{_describe(item)}."
        )

    def _row_desc(self, row: tuple[Any, Any, int, int]) -> str:
        op = row[3]
        return "clean" if op < 0 else f"augmented by {self.op_names[op]!r}"

    def _stack_inputs(self, rows: list[tuple[Any, Any, int, int]]) -> Any:
        first = rows[0][0]
        if self.output == "tensor" and not (isinstance(first, Tensor) or _is_ndarray(first) or _is_pil(first)):
            # Structured inputs (dicts of token ids, tuples of numeric and categorical features, ...).
            try:
                return default_collate([r[0] for r in rows])
            except (TypeError, RuntimeError) as err:
                raise TypeError(f"{self.name}: could not stack the inputs with default_collate: {err}") from err
        tensors = [self._to_tensor(i, r) for i, r in enumerate(rows)]
        ref = tensors[0]
        for i, t in enumerate(tensors):
            if t.shape != ref.shape or t.dtype != ref.dtype:
                raise ValueError(
                    f"{self.name}: row {i} ({self._row_desc(rows[i])}) came back with shape {tuple(t.shape)} and "
                    f"dtype {t.dtype}, but row 0 ({self._row_desc(rows[0])}) has shape {tuple(ref.shape)} and dtype "
                    f"{ref.dtype}; every transform must return the same shape and dtype (add a fixed resize/crop "
                    "or dtype conversion to post_transform)."
                )
        return torch.stack(tensors)

    def _to_tensor(self, i: int, row: tuple[Any, Any, int, int]) -> Tensor:
        x = row[0]
        if isinstance(x, Tensor):
            x = x.as_subclass(Tensor)  # drop tv_tensors wrappers so the batch is a plain tensor
        elif _is_ndarray(x):
            x = torch.from_numpy(_contiguous(x))
        elif self.output == "uint8" and _is_pil(x):
            import numpy as np  # numpy ships with every PIL-based pipeline; imported lazily

            arr = np.asarray(x, dtype=np.uint8)
            x = torch.from_numpy(arr.copy())
            x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
        else:
            hint = " (add e.g. v2.PILToTensor() to post_transform)" if _is_pil(x) else ""
            raise TypeError(
                f"{self.name}: row {i} ({self._row_desc(row)}) is {_describe(x)}; expected a tensor or numpy "
                f"array{hint}."
            )
        if self.output == "uint8":
            if x.dtype != torch.uint8:
                raise TypeError(
                    f"{self.name}: output='uint8' needs uint8 inputs (like timm's fast_collate), but row {i} "
                    f"({self._row_desc(row)}) has dtype {x.dtype}; drop Normalize/ToDtype from the pipeline."
                )
            if x.dim() == 2:
                x = x.unsqueeze(0)
        return x

    def _stack_labels(self, rows: list[tuple[Any, Any, int, int]]) -> Tensor:
        hard: list[int] = []
        soft: list[Tensor] = []
        for i, row in enumerate(rows):
            y = row[1]
            if isinstance(y, bool):
                y = int(y)
            if isinstance(y, int) or _is_int_scalar(y) or _is_one_int(y):
                hard.append(int(y.reshape(()) if _is_one_int(y) else y))  # any integer dtype -> int64 below
                continue
            t = torch.from_numpy(_contiguous(y)) if _is_ndarray(y) else y
            if isinstance(t, Tensor) and t.dim() == 1 and t.is_floating_point():
                soft.append(t)
                continue
            raise TypeError(
                f"{self.name}: the label of row {i} ({self._row_desc(row)}) must be an int class index or a 1-D "
                f"float tensor of class probabilities, but got {_describe(y)}."
            )
        if hard and soft:
            raise TypeError(
                f"{self.name}: labels must be all class indices or all probability vectors, but got {len(hard)} "
                f"class indices and {len(soft)} probability vectors."
            )
        if hard:
            return torch.tensor(hard, dtype=torch.long)
        if len({t.shape for t in soft}) > 1:
            raise ValueError(f"{self.name}: soft labels have different lengths: {sorted({t.shape[0] for t in soft})}.")
        return torch.stack(soft)

    def _apply_batch_transform(self, inputs: Tensor, target: SaflexTarget, start: int) -> tuple[Tensor, SaflexTarget]:
        assert self.batch_transform is not None
        name = f"{self.name} batch_transform={type(self.batch_transform).__name__}"
        head_x, tail_x = inputs[:start], inputs[start:]
        head_t, tail_t = target[:start], target[start:]
        if len(tail_t) == 0:
            return inputs, target
        with seeded(draw_seed(self.generator())):
            out = self.batch_transform(tail_x, tail_t)
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], Tensor)):
            raise TypeError(f"{name} must return (inputs, SaflexTarget), but returned {_describe(out)}.")
        new_x, new_t = out
        if not isinstance(new_t, SaflexTarget):
            raise TypeError(f"{name} must return a SaflexTarget as target, but returned {_describe(new_t)}.")
        if new_x.shape[0] != tail_x.shape[0] or len(new_t) != tail_x.shape[0]:
            raise ValueError(
                f"{name} returned {new_x.shape[0]} inputs and {len(new_t)} targets for a batch of {tail_x.shape[0]}."
            )
        names = new_t.op_names or self.op_names
        if tuple(names[: len(self.op_names)]) != self.op_names:
            raise ValueError(f"{name} changed op_names {self.op_names} to {names}; it may only append names.")
        self.op_names = tuple(names)
        if start == 0:
            return new_x, new_t
        head_t.op_names = tuple(names)
        if new_x.dtype != head_x.dtype:
            raise ValueError(f"{name} changed the input dtype from {head_x.dtype} to {new_x.dtype}.")
        return torch.cat([head_x, new_x]), SaflexTarget.cat([head_t, new_t])


def _as_index(value: Any, position: int, owner: str) -> int:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value)
    if isinstance(value, int) or _is_int_scalar(value):
        return int(value)
    raise TypeError(f"{owner}: the index of sample {position} must be an int, but got {_describe(value)}.")


def _is_int_scalar(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.dim() == 0 and not value.is_floating_point() and not value.is_complex()
    if _is_ndarray(value) or type(value).__module__ == "numpy":
        import numpy as np

        return isinstance(value, np.integer) or (
            isinstance(value, np.ndarray) and value.ndim == 0 and np.issubdtype(value.dtype, np.integer)
        )
    return False


def _is_one_int(value: Any) -> bool:
    """A one-element 1-D integer tensor or array (e.g. a ``TensorDataset`` label column of shape ``(N, 1)``)."""
    if isinstance(value, Tensor):
        return value.shape == (1,) and not (value.is_floating_point() or value.is_complex())
    if _is_ndarray(value):
        import numpy as np

        return value.shape == (1,) and (np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_)
    return False


def _is_ndarray(value: Any) -> bool:
    return type(value).__name__ == "ndarray" and type(value).__module__ == "numpy"


def _contiguous(arr: Any) -> Any:
    import numpy as np

    return np.ascontiguousarray(arr)


def _is_pil(value: Any) -> bool:
    return any(c.__module__.startswith("PIL.") and c.__name__ == "Image" for c in type(value).__mro__)


def _callable_name(fn: Any) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__
