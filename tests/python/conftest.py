import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def fixtures():
    return ROOT / "fixtures"


@pytest.fixture(scope="session")
def cli():
    """Runs the `weightsmith` console script the package installed."""

    def run(*args):
        script = pathlib.Path(sys.executable).parent / "weightsmith"
        return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True,
                               cwd=ROOT, env=dict(os.environ))

    return run
