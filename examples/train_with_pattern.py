"""Train your own ConvNet on Fashion-MNIST with a learned dropout pattern, in plain PyTorch.

The model, the data loading and the training loop below are ordinary PyTorch code that
knows nothing of autodropout; the pattern goes in with one line::

    handle = ad.apply_pattern(model, pattern, example_input=images[:2])

``apply_pattern`` hooks every ``BatchNorm2d`` output (the paper's placement). A pattern
found by a search on the Wide ResNet proxy has one site per WRN stage (28, 14 and 7 pixel
maps); ``example_input`` lets it map those sites onto this network's stages, found by one
forward pass (runs of BatchNorms whose outputs have the same spatial size). ``print(handle)``
shows which module got which site. In ``model.eval()`` every mask is off.

    python examples/train_with_pattern.py --pattern pattern.json [--epochs 5]

``--pattern`` is a JSON or YAML file as ``autodropout patterns export NAME -o pattern.json``
writes it, or a built-in pattern such as ``builtin:wrn-fashion-mnist`` (``autodropout
patterns list --builtin`` lists them). The data are the four gzip-compressed IDX files of
Fashion-MNIST in ``--data-dir/fashion-mnist/`` (default: ``shared/data`` beside the
repository).
"""

from __future__ import annotations

import argparse
import gzip
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import autodropout as ad

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


class ConvNet(nn.Module):
    """VGG-style: per stage two 3x3 convolution-BatchNorm-ReLU layers, a 2x2 max-pool between
    stages, then global average pooling and a linear classifier. Three stages on 28x28
    inputs see maps of 28, 14 and 7 pixels."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), num_classes: int = 10) -> None:
        super().__init__()
        in_channels = 1
        for index, width in enumerate(widths, 1):
            self.add_module(f"stage{index}", nn.Sequential(
                nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                nn.ReLU(inplace=True)))
            in_channels = width
        self.stages = len(widths)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for index in range(1, self.stages + 1):
            if index > 1:
                x = F.max_pool2d(x, 2)
            x = getattr(self, f"stage{index}")(x)
        return self.classifier(x.mean(dim=(2, 3)))


def read_idx(path: Path) -> Tensor:
    """The uint8 array of a gzip-compressed IDX file: a 4-byte magic number whose last byte
    is the number of dimensions, one big-endian 4-byte size per dimension, then the data."""
    if not path.is_file():
        raise SystemExit(f"--data-dir: no file {path}")
    with gzip.open(path, "rb") as stream:
        content = bytearray(stream.read())  # writable, so torch can share it
    ndim = content[3]
    shape = np.frombuffer(content, ">u4", count=ndim, offset=4).astype(int)
    return torch.from_numpy(np.frombuffer(content, np.uint8, offset=4 + 4 * ndim).reshape(shape))


def load_split(data_dir: Path, split: str) -> tuple[Tensor, Tensor]:
    """(images as float (N, 1, 28, 28) in [0, 1], labels int64) of ``split``."""
    image_file, label_file = (data_dir / "fashion-mnist" / name for name in FILES[split])
    images = read_idx(image_file).unsqueeze(1).float() / 255
    return images, read_idx(label_file).long()


def train_epoch(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int,
                optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
                ) -> float:
    """One pass over the shuffled examples; the mean training loss."""
    model.train()
    order = torch.randperm(len(labels), device=labels.device)
    total = 0.0
    for batch in order.split(batch_size):
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(batch)
    return total / len(labels)


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    model.eval()  # every pattern mask is off from here on
    correct = sum(int((model(x).argmax(dim=1) == y).sum())
                  for x, y in zip(images.split(batch_size), labels.split(batch_size)))
    return correct / len(labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", required=True,
                        help="pattern file (.json, .yaml) or builtin:NAME")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-examples", type=int, default=60000)
    parser.add_argument("--test-examples", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    train_images, train_labels = load_split(args.data_dir, "train")
    test_images, test_labels = load_split(args.data_dir, "test")
    train_images, train_labels = train_images[:args.train_examples], train_labels[:args.train_examples]
    test_images, test_labels = test_images[:args.test_examples], test_labels[:args.test_examples]
    mean, std = train_images.mean(), train_images.std()
    train_images = ((train_images - mean) / std).to(device)
    test_images = ((test_images - mean) / std).to(device)
    train_labels, test_labels = train_labels.to(device), test_labels.to(device)

    model = ConvNet().to(device)
    pattern = ad.load_pattern(args.pattern)
    handle = ad.apply_pattern(model, pattern, example_input=train_images[:2])
    print(handle)

    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    steps = args.epochs * math.ceil(len(train_labels) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        loss = train_epoch(model, train_images, train_labels, args.batch_size, optimizer,
                           scheduler)
        print(f"epoch {epoch}/{args.epochs}: train loss {loss:.4f} "
              f"({time.perf_counter() - started:.1f} s)")
    print(f"test accuracy: {accuracy(model, test_images, test_labels):.4f} "
          f"({len(test_labels)} test images)")
    handle.remove()  # the model is exactly as it was before apply_pattern
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
