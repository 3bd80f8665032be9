"""Benchmark datasets in their original formats, and the train/validation hold-out.

``load_dataset(name)`` returns a :class:`DatasetBundle`; files are found or downloaded by
:mod:`workers.download`. Formats:

* ``fashion-mnist``, ``mnist``: gzip-compressed IDX (big-endian uint32 header: magic 2051,
  n, rows, cols for images; magic 2049, n for labels; then uint8 data).
* ``cifar-10``: the python pickle batches ``cifar-10-batches-py/data_batch_1..5`` and
  ``test_batch``, read from ``cifar-10-python.tar.gz`` or an extracted folder.
* ``ptb``, ``wikitext-2``: word-level text, one ``<eos>`` appended per line, ids in order of
  first appearance in the training split (the pytorch/examples ``Corpus`` convention).
* ``synthetic``, ``synthetic-text``: small generated datasets for tests and smoke runs.

Images stay uint8 (N, C, H, W) in memory; the training loop converts batches to float.
The test split is loaded for final evaluation only: a search validates on a part of the
training split held out by :func:`validation_split`.
"""

from __future__ import annotations

import gzip
import math
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np
import torch
from torch import Tensor

from autodropout.validation import check_int

from .download import MissingData, locate
from .registry import DATASETS

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
EOS, UNK = "<eos>", "<unk>"
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TARBALL = "cifar-10-python.tar.gz"
CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
TEXT_FILES = {"ptb": ("ptb.train.txt", "ptb.test.txt"), "wikitext-2": ("train.txt", "test.txt")}


class DataFormatError(ValueError):
    """A dataset file that does not have the expected format; the message names the file."""


@dataclass(frozen=True)
class Images:
    """Labelled images: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.labels.numel()

    def subset(self, index: Tensor) -> Images:
        return Images(self.images[index], self.labels[index])


@dataclass(frozen=True)
class DatasetBundle:
    """A loaded dataset: train and test splits plus what a child model needs to know.

    Image datasets hold :class:`Images` and ``num_classes``; text datasets hold LongTensor
    token streams and ``vocab`` (the words by id).
    """

    name: str
    train: Images | Tensor
    test: Images | Tensor
    num_classes: int | None = None
    vocab: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return "image" if isinstance(self.train, Images) else "text"

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train.images.shape[2:])

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


class Holdout(NamedTuple):
    """The training examples of a search trial and its validation examples (disjoint)."""

    train: Images | Tensor
    validation: Images | Tensor


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = True,
                 mirror: str | None = None) -> DatasetBundle:
    """Load dataset ``name`` (a name of :data:`~workers.registry.DATASETS`); see
    :mod:`workers.download` for where its files are looked for and downloaded from."""
    return DATASETS.get(name, "name")(name, data_dir, download, mirror)


def validation_split(train: Images | Tensor, validation_examples: int,
                     train_examples: int | None = None, seed: int = 0) -> Holdout:
    """Hold out ``validation_examples`` of the training split for validation.

    Images: a random permutation drawn from ``seed`` gives the validation examples first and
    then ``train_examples`` training examples (default: all the rest). Token streams: the
    last ``validation_examples`` tokens validate and the first ``train_examples`` train, as
    contiguous blocks so sentences stay whole (``seed`` plays no part).
    """
    total = len(train)
    check_int(validation_examples, "validation_examples", low=1, high=total - 1)
    available = total - validation_examples
    train_examples = available if train_examples is None else train_examples
    check_int(train_examples, f"train_examples ({total} examples, {validation_examples} held "
              "out)", low=1, high=available)
    if isinstance(train, Tensor):
        return Holdout(train[:train_examples], train[available:])
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return Holdout(train.subset(order[validation_examples:validation_examples + train_examples]),
                   train.subset(order[:validation_examples]))


# -- IDX (MNIST, Fashion-MNIST) ---------------------------------------------------------------
def read_idx(path: str | Path, magic: int) -> Tensor:
    """The uint8 array of a gzip-compressed IDX file whose header must start with ``magic``."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as stream:
            content = stream.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DataFormatError(f"{path}: not a readable gzip file ({error})") from None
    ndim = magic & 0xFF
    header_bytes = 4 * (1 + ndim)
    if len(content) < header_bytes:
        raise DataFormatError(f"{path}: {len(content)} bytes is too short for an IDX header")
    header = np.frombuffer(content, dtype=">u4", count=1 + ndim)
    if header[0] != magic:
        raise DataFormatError(f"{path}: IDX magic number is {header[0]}, expected {magic}")
    shape = tuple(int(size) for size in header[1:])
    expected = header_bytes + math.prod(shape)
    if len(content) != expected:
        raise DataFormatError(
            f"{path}: header says {shape} (so {expected} bytes), but the file has {len(content)}"
        )
    return torch.frombuffer(bytearray(content[header_bytes:]), dtype=torch.uint8).view(shape)


def _load_idx_split(folder: Path, split: str) -> Images:
    image_file, label_file = (folder / name for name in IDX_FILES[split])
    images = read_idx(image_file, IMAGE_MAGIC)
    labels = read_idx(label_file, LABEL_MAGIC)
    if len(images) != len(labels):
        raise DataFormatError(
            f"{label_file}: {len(labels)} labels for the {len(images)} images of {image_file}"
        )
    return Images(images.unsqueeze(1), _checked_labels(labels, 10, label_file))


def _checked_labels(labels: Tensor | list[int], num_classes: int, source: Path | str) -> Tensor:
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise DataFormatError(f"{source}: labels must lie in [0, {num_classes})")
    return labels


def _load_idx(name: str, data_dir, download: bool, mirror: str | None) -> DatasetBundle:
    files = IDX_FILES["train"] + IDX_FILES["test"]
    folder = locate(name, files, data_dir, download, mirror)
    return DatasetBundle(name, _load_idx_split(folder, "train"), _load_idx_split(folder, "test"),
                         num_classes=10)


# -- CIFAR-10 -------------------------------------------------------------------------------------
class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches: dicts of bytes, lists and numpy arrays, and nothing else
    (a pickle can otherwise call any importable function)."""

    ALLOWED = {
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch")
        return super().find_class(module, name)


def read_cifar_batch(stream: IO[bytes], source: str) -> Images:
    """One CIFAR-10 python batch: a pickled dict with ``data`` (N, 3072) uint8 and ``labels``."""
    try:
        batch = _BatchUnpickler(stream, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise DataFormatError(f"{source}: not a CIFAR-10 python batch ({error})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataFormatError(f"{source}: a CIFAR-10 batch must be a dict with data and labels")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32 or len(batch[b"labels"]) != data.shape[0]:
        raise DataFormatError(f"{source}: data must be uint8 (N, 3072) with N labels")
    images = torch.from_numpy(data.copy()).view(-1, 3, 32, 32)
    return Images(images, _checked_labels(batch[b"labels"], 10, source))


def _concatenate(parts: list[Images]) -> Images:
    return Images(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def _load_cifar10(name: str, data_dir, download: bool, mirror: str | None) -> DatasetBundle:
    extracted = tuple(f"{CIFAR_FOLDER}/{batch}" for batch in (*CIFAR_BATCHES, "test_batch"))
    try:
        folder = locate(name, extracted, data_dir, download_missing=False)
    except FileNotFoundError:
        try:
            tarball = locate(name, (CIFAR_TARBALL,), data_dir, download, mirror)
        except MissingData as error:
            raise MissingData(f"{error} (or the extracted {CIFAR_FOLDER}/ folder)") from None
        return _load_cifar10_tarball(tarball)

    def read(batch: str) -> Images:
        path = folder / CIFAR_FOLDER / batch
        with open(path, "rb") as stream:
            return read_cifar_batch(stream, str(path))

    return DatasetBundle(name, _concatenate([read(b) for b in CIFAR_BATCHES]), read("test_batch"),
                         num_classes=10)


def _load_cifar10_tarball(folder: Path) -> DatasetBundle:
    path = folder / CIFAR_TARBALL
    batches = {}
    try:
        with tarfile.open(path, "r:gz") as archive:
            for batch in (*CIFAR_BATCHES, "test_batch"):
                member = f"{CIFAR_FOLDER}/{batch}"
                stream = archive.extractfile(member)
                if stream is None:
                    raise DataFormatError(f"{path}: {member} is not a file")
                batches[batch] = read_cifar_batch(stream, f"{path}:{member}")
    except (tarfile.TarError, KeyError, OSError, EOFError, zlib.error) as error:
        raise DataFormatError(f"{path}: not a CIFAR-10 python tarball ({error})") from None
    return DatasetBundle("cifar-10", _concatenate([batches[b] for b in CIFAR_BATCHES]),
                         batches["test_batch"], num_classes=10)


# -- word-level text (PTB, WikiText-2) ------------------------------------------------------------
def read_words(path: str | Path) -> list[str]:
    """The whitespace-separated words of a text file, with ``<eos>`` after every line."""
    words: list[str] = []
    try:
        with open(path, encoding="utf-8", newline=None) as stream:
            for line in stream:
                words.extend(line.split())
                words.append(EOS)
    except UnicodeDecodeError as error:
        raise DataFormatError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") \
            from None
    if not any(word != EOS for word in words):
        raise DataFormatError(f"{path}: holds no words")
    return words


def build_vocab(words: list[str]) -> tuple[str, ...]:
    """Distinct words in order of first appearance."""
    return tuple(dict.fromkeys(words))


def encode_words(words: list[str], vocab: tuple[str, ...], source: str | Path) -> Tensor:
    """Token ids (LongTensor); a word outside ``vocab`` becomes ``<unk>`` if it has one."""
    index = {word: i for i, word in enumerate(vocab)}
    unknown = index.get(UNK)
    try:
        ids = [index[word] if unknown is None else index.get(word, unknown) for word in words]
    except KeyError as error:
        raise DataFormatError(f"{source}: word {error.args[0]!r} is not in the training "
                              "vocabulary, which has no <unk>") from None
    return torch.tensor(ids, dtype=torch.int64)


def _load_text(name: str, data_dir, download: bool, mirror: str | None) -> DatasetBundle:
    train_file, test_file = TEXT_FILES[name]
    folder = locate(name, TEXT_FILES[name], data_dir, download, mirror)
    train_words = read_words(folder / train_file)
    vocab = build_vocab(train_words)
    return DatasetBundle(
        name,
        encode_words(train_words, vocab, folder / train_file),
        encode_words(read_words(folder / test_file), vocab, folder / test_file),
        vocab=vocab,
    )


# -- synthetic ------------------------------------------------------------------------------------
SYNTHETIC_SEED = 1234


def synthetic_images(n: int, seed: int = SYNTHETIC_SEED, size: int = 28) -> Images:
    """Ten classes of sinusoidal gratings on noise: class ``c`` has orientation
    ``36 (c mod 5)`` degrees and a period of 8 px (``c < 5``) or 4 px (``c >= 5``); the phase
    is random. Translation-invariant, so a small ConvNet with global pooling learns it in a
    few dozen steps."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(10, (n,), generator=generator)
    angle = (labels % 5) * (math.pi / 5)
    frequency = torch.where(labels < 5, 1 / 8, 1 / 4) * 2 * math.pi
    phase = torch.rand(n, generator=generator) * 2 * math.pi
    grid = torch.arange(size, dtype=torch.float32)
    along = (grid.view(1, 1, -1) * torch.cos(angle).view(-1, 1, 1)
             + grid.view(1, -1, 1) * torch.sin(angle).view(-1, 1, 1))
    grating = 60 * torch.cos(frequency.view(-1, 1, 1) * along + phase.view(-1, 1, 1))
    noise = 80 * (torch.rand(n, size, size, generator=generator) - 0.5)
    images = (128 + grating + noise).round().clamp(0, 255).to(torch.uint8).unsqueeze(1)
    return Images(images, labels)


def synthetic_tokens(n: int, vocab_size: int, seed: int = SYNTHETIC_SEED) -> Tensor:
    """A Markov chain over ``vocab_size`` tokens: after ``t`` comes ``(3 t + 1) mod V`` or
    ``(3 t + 2) mod V`` with equal odds, so a model that learns it reaches perplexity 2."""
    generator = torch.Generator().manual_seed(seed)
    coin = torch.randint(2, (n,), generator=generator).tolist()
    tokens = [0]
    for bit in coin[1:]:
        tokens.append((3 * tokens[-1] + 1 + bit) % vocab_size)
    return torch.tensor(tokens, dtype=torch.int64)


def _load_synthetic(name: str, *_) -> DatasetBundle:
    return DatasetBundle(name, synthetic_images(2048), synthetic_images(512, SYNTHETIC_SEED + 1),
                         num_classes=10)


def _load_synthetic_text(name: str, *_) -> DatasetBundle:
    vocab = tuple(f"w{i}" for i in range(16))
    return DatasetBundle(name, synthetic_tokens(16384, len(vocab)),
                         synthetic_tokens(4096, len(vocab), SYNTHETIC_SEED + 1), vocab=vocab)
