"""The installed command answers at once; each top-level package says what it is for."""

import subprocess
import sys

import autodropout


def test_cli_version_and_help():
    out = subprocess.run(
        [sys.executable, "-m", "autodropout", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"autodropout {autodropout.__version__}"
    out = subprocess.run(
        [sys.executable, "-m", "autodropout", "--help"], capture_output=True, text=True, check=True
    )
    assert "usage: autodropout" in out.stdout
    for command in ("search", "train", "patterns", "searches", "spaces"):
        assert command in out.stdout


def test_top_level_packages_have_roles():
    import controller
    import patterns_db
    import search_spaces
    import workers

    for package in (search_spaces, controller, workers, patterns_db):
        assert package.__doc__ and len(package.__doc__.split()) > 8
