"""Dataset loaders: the real files in ../shared/data, hand-made files, synthetic data, and
the validation hold-out."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from workers.datasets import (
    DataFormatError,
    Images,
    load_dataset,
    read_idx,
    synthetic_images,
    validation_split,
)


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    """A gzip IDX file holding uint8 ``array`` (magic 0x08nn: uint8 with nn dimensions)."""
    magic = 0x0800 + array.ndim if magic is None else magic
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())
    return path


def write_idx_dataset(folder: Path, images: Images, test: Images) -> Path:
    """An MNIST-layout folder (train and t10k, images and labels) from uint8 ``Images``."""
    for prefix, split in (("train", images), ("t10k", test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", split.images[:, 0].numpy())
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", split.labels.numpy())
    return folder


def cifar_batch(count: int, first_label: int) -> dict:
    data = np.arange(count * 3072, dtype=np.int64).reshape(count, 3072) % 251
    labels = [(first_label + i) % 10 for i in range(count)]
    return {b"batch_label": b"hand-made", b"data": data.astype(np.uint8), b"labels": labels,
            b"filenames": [b"x.png"] * count}


CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


# -- real files ----------------------------------------------------------------------------
def test_fashion_mnist_real_files(shared_data_dir):
    bundle = load_dataset("fashion-mnist", data_dir=shared_data_dir, download=False)
    assert bundle.kind == "image"
    assert bundle.train.images.shape == (60000, 1, 28, 28)
    assert bundle.train.images.dtype == torch.uint8 and bundle.train.labels.dtype == torch.int64
    assert bundle.test.images.shape == (10000, 1, 28, 28)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 1, (28, 28))
    # README: 6000 images per class in train, 1000 in test
    assert bundle.train.labels.bincount().tolist() == [6000] * 10
    assert bundle.test.labels.bincount().tolist() == [1000] * 10
    assert 0 < bundle.train.images.float().mean() < 255


def test_mnist_real_label_counts(shared_data_dir):
    bundle = load_dataset("mnist", data_dir=shared_data_dir, download=False)
    assert bundle.train.labels.bincount().tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert bundle.test.labels.bincount().tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.parametrize("name, train_tokens, test_tokens, vocab", [
    ("ptb", 929589, 82430, 10000),
    ("wikitext-2", 2088628, 245569, 33278),
])
def test_word_level_text_real_files(shared_data_dir, name, train_tokens, test_tokens, vocab):
    bundle = load_dataset(name, data_dir=shared_data_dir, download=False)
    assert bundle.kind == "text"
    assert bundle.train.dtype == torch.int64
    assert (len(bundle.train), len(bundle.test), bundle.vocab_size) == (
        train_tokens, test_tokens, vocab)
    eos = bundle.vocab.index("<eos>")
    first_line = Path(shared_data_dir, name, "ptb.train.txt" if name == "ptb" else "train.txt")
    words = first_line.open(encoding="utf-8").readline().split()
    assert [bundle.vocab[i] for i in bundle.train[: len(words) + 1]] == words + ["<eos>"]
    assert int(bundle.train[len(words)]) == eos


# -- hand-made IDX ---------------------------------------------------------------------------
def test_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = read_idx(write_idx(tmp_path / "x.gz", array), 2051)
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 4)
    assert torch.equal(out, torch.from_numpy(array))


def test_idx_wrong_magic_names_file(tmp_path):
    path = write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((2, 3, 4)), magic=2050)
    with pytest.raises(DataFormatError, match=r"train-images-idx3-ubyte\.gz.*magic.*2050.*2051"):
        read_idx(path, 2051)


def test_idx_size_disagreeing_with_header(tmp_path):
    path = tmp_path / "labels.gz"
    with gzip.open(path, "wb") as stream:
        stream.write(struct.pack(">2I", 2049, 5) + bytes(4))  # header says 5 labels, 4 follow
    with pytest.raises(DataFormatError, match=r"labels\.gz.*\(5,\).*13 bytes.*has 12"):
        read_idx(path, 2049)


def test_idx_truncated_header_and_not_gzip(tmp_path):
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as stream:
        stream.write(struct.pack(">2I", 2051, 1))
    with pytest.raises(DataFormatError, match=r"short\.gz.*too short"):
        read_idx(short, 2051)
    plain = tmp_path / "plain.gz"
    plain.write_bytes(b"not gzip at all")
    with pytest.raises(DataFormatError, match=r"plain\.gz.*gzip"):
        read_idx(plain, 2051)


def test_idx_dataset_checks_label_count_and_range(tmp_path):
    good = synthetic_images(6)
    folder = write_idx_dataset(tmp_path / "mnist", good, good)
    assert torch.equal(load_dataset("mnist", tmp_path, download=False).train.images, good.images)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(5))
    with pytest.raises(DataFormatError, match=r"train-labels-idx1-ubyte\.gz.*5 labels.*6 images"):
        load_dataset("mnist", tmp_path, download=False)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.full(6, 10))
    with pytest.raises(DataFormatError, match=r"train-labels-idx1-ubyte\.gz.*\[0, 10\)"):
        load_dataset("mnist", tmp_path, download=False)


# -- hand-made CIFAR-10 ----------------------------------------------------------------------
def write_cifar_tarball(folder: Path, batches: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True)
    path = folder / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for name, content in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return path


def check_cifar_bundle(bundle):
    assert bundle.train.images.shape == (5 * 3, 3, 32, 32)
    assert bundle.test.images.shape == (3, 3, 32, 32)
    assert bundle.train.labels.tolist() == [(b + i) % 10 for b in range(5) for i in range(3)]
    expected = np.arange(3 * 3072) % 251
    # rows are channel-major: the first 1024 bytes are the red plane, row by row
    assert torch.equal(bundle.test.images.flatten(), torch.from_numpy(expected).to(torch.uint8))
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 3, (32, 32))


def test_cifar_tarball_and_extracted(tmp_path):
    pickled = {name: pickle.dumps(cifar_batch(3, i), protocol=2)
               for i, name in enumerate(CIFAR_BATCHES[:5])}
    pickled["test_batch"] = pickle.dumps(cifar_batch(3, 0), protocol=2)
    write_cifar_tarball(tmp_path / "packed" / "cifar-10", pickled)
    check_cifar_bundle(load_dataset("cifar-10", tmp_path / "packed", download=False))

    extracted = tmp_path / "open" / "cifar-10" / "cifar-10-batches-py"
    extracted.mkdir(parents=True)
    for name, content in pickled.items():
        (extracted / name).write_bytes(content)
    check_cifar_bundle(load_dataset("cifar-10", tmp_path / "open", download=False))


def test_cifar_refuses_foreign_pickles_and_bad_batches(tmp_path):
    evil = pickle.dumps({b"data": os.getcwd}, protocol=2)  # a pickle naming a function
    batches = {name: evil for name in CIFAR_BATCHES}
    write_cifar_tarball(tmp_path / "evil" / "cifar-10", batches)
    with pytest.raises(DataFormatError, match=r"data_batch_1.*unexpected object"):
        load_dataset("cifar-10", tmp_path / "evil", download=False)

    wrong = cifar_batch(2, 0)
    wrong[b"data"] = wrong[b"data"][:, :100]
    batches = {name: pickle.dumps(wrong, protocol=2) for name in CIFAR_BATCHES}
    write_cifar_tarball(tmp_path / "wrong" / "cifar-10", batches)
    with pytest.raises(DataFormatError, match=r"data_batch_1.*uint8 \(N, 3072\)"):
        load_dataset("cifar-10", tmp_path / "wrong", download=False)

    garbage = tmp_path / "garbage" / "cifar-10"
    garbage.mkdir(parents=True)
    (garbage / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(DataFormatError, match=r"cifar-10-python\.tar\.gz.*not a CIFAR-10"):
        load_dataset("cifar-10", tmp_path / "garbage", download=False)


# -- hand-made text ----------------------------------------------------------------------------
def test_text_vocabulary_from_train_and_unknown_words(tmp_path):
    folder = tmp_path / "ptb"
    folder.mkdir()
    (folder / "ptb.train.txt").write_text(" a b\n b <unk> c\n\n")
    (folder / "ptb.test.txt").write_text(" c zebra a\n")
    bundle = load_dataset("ptb", tmp_path, download=False)
    assert bundle.vocab == ("a", "b", "<eos>", "<unk>", "c")
    assert bundle.train.tolist() == [0, 1, 2, 1, 3, 4, 2, 2]  # the blank line is one <eos>
    assert bundle.test.tolist() == [4, 3, 0, 2]  # zebra -> <unk>

    (folder / "ptb.train.txt").write_text(" a b\n")
    with pytest.raises(DataFormatError, match=r"ptb\.test\.txt.*'c'.*no <unk>"):
        load_dataset("ptb", tmp_path, download=False)


def test_text_that_is_not_utf8_or_empty_names_the_file(tmp_path):
    folder = tmp_path / "ptb"
    folder.mkdir()
    (folder / "ptb.test.txt").write_text("a\n")
    (folder / "ptb.train.txt").write_bytes(b"a b\n\xff\xfe c\n")
    with pytest.raises(DataFormatError, match=r"ptb\.train\.txt: not UTF-8 text \(byte 4"):
        load_dataset("ptb", tmp_path, download=False)
    (folder / "ptb.train.txt").write_bytes(b"")
    with pytest.raises(DataFormatError, match=r"ptb\.train\.txt: holds no words"):
        load_dataset("ptb", tmp_path, download=False)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="name must be one of .*fashion-mnist"):
        load_dataset("imagenet")


# -- synthetic ------------------------------------------------------------------------------------
def test_synthetic_is_deterministic_and_balanced_enough():
    first, second = load_dataset("synthetic"), load_dataset("synthetic")
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.labels, second.test.labels)
    assert first.train.images.shape == (2048, 1, 28, 28)
    assert first.train.images.dtype == torch.uint8
    assert first.train.labels.bincount(minlength=10).min() > 100
    assert not torch.equal(first.train.images[:512], first.test.images)


def test_synthetic_text_is_a_markov_chain():
    bundle = load_dataset("synthetic-text")
    tokens = bundle.train
    step = (tokens[1:] - 3 * tokens[:-1]) % bundle.vocab_size
    assert set(step.tolist()) == {1, 2}
    assert torch.equal(tokens, load_dataset("synthetic-text").train)


# -- validation hold-out ----------------------------------------------------------------------
def numbered_images(count: int) -> Images:
    """Images whose label is their index, to follow examples through a split."""
    return Images(torch.zeros(count, 1, 2, 2, dtype=torch.uint8), torch.arange(count))


def test_validation_split_is_disjoint_and_deterministic():
    train = numbered_images(100)
    held = validation_split(train, validation_examples=20, train_examples=50, seed=3)
    assert (len(held.train), len(held.validation)) == (50, 20)
    assert not set(held.train.labels.tolist()) & set(held.validation.labels.tolist())
    again = validation_split(train, validation_examples=20, train_examples=50, seed=3)
    assert torch.equal(held.validation.labels, again.validation.labels)
    assert torch.equal(held.train.labels, again.train.labels)
    other = validation_split(train, validation_examples=20, train_examples=50, seed=4)
    assert not torch.equal(held.validation.labels, other.validation.labels)
    rest = validation_split(train, validation_examples=20)
    assert sorted(rest.train.labels.tolist() + rest.validation.labels.tolist()) == list(range(100))


def test_validation_split_draws_from_train_only():
    bundle = load_dataset("synthetic")
    test_before = bundle.test.images.clone()
    held = validation_split(bundle.train, 128, 256)
    train_rows = {row.numpy().tobytes() for row in bundle.train.images}
    assert all(row.numpy().tobytes() in train_rows for row in held.validation.images)
    assert torch.equal(bundle.test.images, test_before)


def test_validation_split_of_a_token_stream():
    stream = torch.arange(1000)
    held = validation_split(stream, validation_examples=100, train_examples=600)
    assert torch.equal(held.train, torch.arange(600))
    assert torch.equal(held.validation, torch.arange(900, 1000))


@pytest.mark.parametrize("validation, train, match", [
    (0, None, "validation_examples"),
    (100, None, "validation_examples"),
    (True, None, "validation_examples"),
    (10, 91, "train_examples"),
    (10, 0, "train_examples"),
])
def test_validation_split_bad_sizes(validation, train, match):
    with pytest.raises(ValueError, match=match):
        validation_split(numbered_images(100), validation, train)
