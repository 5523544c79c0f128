"""pytest glue shared by tests/ and sim_tests/: one Verilator build cache for the whole run."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent


@pytest.fixture(scope="session", autouse=True)
def sim_cache():
    """MOEFPGA_CACHE for the test session, so a design built by one module (the layer top, the
    board twin) is reused by the others: ``MOEFPGA_TEST_SIM_CACHE`` when set (kept between
    runs), else a fresh folder under build/ that is removed at the end."""
    keep = os.environ.get("MOEFPGA_TEST_SIM_CACHE")
    if keep:
        folder = Path(keep)
        folder.mkdir(parents=True, exist_ok=True)
    else:
        (REPO / "build").mkdir(exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="test-sim-cache-", dir=REPO / "build"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOEFPGA_CACHE", str(folder))
        yield folder
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
