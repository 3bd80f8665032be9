import subprocess
import sys

import autodropout


def test_import_is_light():
    code = (
        "import sys, autodropout; "
        "heavy = [m for m in ('ray', 'sqlalchemy', 'yaml', 'alembic', 'matplotlib') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import autodropout pulled in: {out.stdout.strip()}"


def test_cli_version_and_help():
    out = subprocess.run(
        [sys.executable, "-m", "autodropout", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"autodropout {autodropout.__version__}"
    out = subprocess.run(
        [sys.executable, "-m", "autodropout", "--help"], capture_output=True, text=True, check=True
    )
    assert "usage: autodropout" in out.stdout


def test_top_level_packages_have_roles():
    import controller
    import patterns_db
    import search_spaces
    import workers

    for package in (search_spaces, controller, workers, patterns_db):
        assert package.__doc__ and len(package.__doc__.split()) > 8
