"""Downloads against a real HTTP server on 127.0.0.1 serving copies of ../shared/data."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import pytest

from workers.datasets import load_dataset
from workers.download import (
    SOURCES,
    DownloadError,
    MissingData,
    cache_dir,
    download,
    locate,
    sha256_of,
)

LABELS = "train-labels-idx1-ubyte.gz"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def served(tmp_path):
    """(root folder served, base URL) of a loopback HTTP server."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache (XDG_CACHE_HOME) and no data dir or mirror from the environment."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("AUTODROPOUT_DATA_DIR", raising=False)
    monkeypatch.delenv("AUTODROPOUT_DATA_MIRROR", raising=False)
    return tmp_path / "xdg" / "autodropout"


def serve_copy(root: Path, shared_data_dir: str, dataset: str, name: str) -> Path:
    target = root / dataset / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(shared_data_dir, dataset, name), target)
    return target


def test_pinned_checksums_match_the_shared_copies(shared_data_dir):
    listed = {}
    for line in Path(shared_data_dir, "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name.lstrip("*").removeprefix("./")] = digest
    pinned = {f"{dataset}/{name}": digest for dataset, source in SOURCES.items()
              for name, digest in source.sha256.items() if dataset != "cifar-10"}
    assert pinned.items() <= listed.items()


def test_download_verifies_and_renames(served, shared_data_dir, tmp_path):
    root, url = served
    original = serve_copy(root, shared_data_dir, "fashion-mnist", LABELS)
    folder = tmp_path / "out"
    result = download(f"{url}/fashion-mnist/{LABELS}", folder / LABELS,
                      SOURCES["fashion-mnist"].sha256[LABELS])
    assert result == folder / LABELS
    assert result.read_bytes() == original.read_bytes()
    assert [p.name for p in folder.iterdir()] == [LABELS]


def test_checksum_mismatch_deletes_the_download(served, shared_data_dir, tmp_path):
    root, url = served
    served_file = serve_copy(root, shared_data_dir, "fashion-mnist", LABELS)
    actual = hashlib.sha256(served_file.read_bytes()).hexdigest()
    wrong = "0" * 64
    folder = tmp_path / "out"
    with pytest.raises(DownloadError) as error:
        download(f"{url}/fashion-mnist/{LABELS}", folder / LABELS, wrong)
    message = str(error.value)
    assert LABELS in message and wrong in message and actual in message
    assert list(folder.iterdir()) == []


def test_http_404_leaves_nothing(served, tmp_path):
    _, url = served
    folder = tmp_path / "out"
    with pytest.raises(DownloadError, match=rf"{LABELS}: HTTP 404"):
        download(f"{url}/missing/{LABELS}", folder / LABELS, "0" * 64)
    assert list(folder.iterdir()) == []


def test_corrupted_mirror_file_is_not_cached(served, cache):
    root, url = served
    bad = root / "fashion-mnist" / LABELS
    bad.parent.mkdir()
    bad.write_bytes(b"tampered")
    with pytest.raises(DownloadError, match="checksum mismatch"):
        locate("fashion-mnist", (LABELS,), mirror=url)
    assert list((cache / "fashion-mnist").iterdir()) == []


def test_load_dataset_downloads_from_env_mirror_into_cache(served, cache, shared_data_dir,
                                                           monkeypatch):
    root, url = served
    for name in SOURCES["ptb"].sha256:
        serve_copy(root, shared_data_dir, "ptb", name)
    monkeypatch.setenv("AUTODROPOUT_DATA_MIRROR", url)
    bundle = load_dataset("ptb")
    assert (len(bundle.train), len(bundle.test), bundle.vocab_size) == (929589, 82430, 10000)
    for name, digest in SOURCES["ptb"].sha256.items():
        assert sha256_of(cache / "ptb" / name) == digest
    shutil.rmtree(root / "ptb")  # the second load reads the cache
    assert load_dataset("ptb", download=False).vocab == bundle.vocab


def test_data_dir_comes_before_the_cache_and_download(cache, tmp_path, shared_data_dir):
    assert locate("ptb", ("ptb.test.txt",), data_dir=shared_data_dir) == Path(shared_data_dir, "ptb")
    with pytest.raises(FileNotFoundError, match=r"ptb does not exist: .*ptb/ptb\.test\.txt"):
        locate("ptb", ("ptb.test.txt",), data_dir=tmp_path, download_missing=False)
    assert not cache.exists()


def test_explicit_data_dir_lacking_files_never_falls_back(served, cache, shared_data_dir,
                                                          tmp_path, monkeypatch):
    """Neither the cache nor a mirror replaces the folder the user named."""
    root, url = served
    serve_copy(root, shared_data_dir, "ptb", "ptb.train.txt")
    serve_copy(root, shared_data_dir, "ptb", "ptb.test.txt")
    (cache / "ptb").mkdir(parents=True)
    shutil.copyfile(Path(shared_data_dir, "ptb", "ptb.train.txt"), cache / "ptb" / "ptb.train.txt")
    folder = tmp_path / "mine" / "ptb"
    folder.mkdir(parents=True)
    (folder / "ptb.train.txt").write_text("a b\n")
    with pytest.raises(MissingData, match=rf"{folder} lacks ptb\.test\.txt: the data folder "
                       r"must hold ptb/ptb\.train\.txt and ptb\.test\.txt"):
        load_dataset("ptb", tmp_path / "mine", mirror=url)
    monkeypatch.setenv("AUTODROPOUT_DATA_DIR", str(tmp_path / "mine"))
    with pytest.raises(MissingData, match=r"\(from AUTODROPOUT_DATA_DIR\) lacks ptb\.test\.txt"):
        load_dataset("ptb", mirror=url)
    assert sorted(p.name for p in (cache / "ptb").iterdir()) == ["ptb.train.txt"]
    with pytest.raises(MissingData, match=r"cifar-10 does not exist: .*cifar-10-python\.tar\.gz"
                       r".* \(or the extracted cifar-10-batches-py/ folder\)"):
        load_dataset("cifar-10", tmp_path / "mine")


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "autodropout"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "autodropout"
