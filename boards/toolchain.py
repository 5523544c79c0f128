"""Running the YoWASP tools (yosys, nextpnr, icepack, ecppack) from the project's virtualenv."""

import shutil
import subprocess
import sys
from pathlib import Path

from .config import BoardError

__all__ = ["find_tool", "run_tool"]


def find_tool(name):
    """The path of the tool ``name``: next to the running Python (the virtualenv's ``bin``),
    else on ``PATH``.

    Raises
    ------
    BoardError
        If the tool is in neither place.
    """
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise BoardError(f"{name} not found; install the board tools with "
                         f".venv/bin/pip install -e '.[boards]'")
    return found


def run_tool(name, args, *, cwd, timeout):
    """Run the tool ``name`` with ``args`` in ``cwd``; returns its combined output.

    Raises
    ------
    BoardError
        If the tool is missing, runs longer than ``timeout`` seconds (it is killed), or exits
        with an error; the message ends with the last lines of its output.
    """
    command = [find_tool(name), *args]
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BoardError(f"{name} ran longer than {timeout} s and was stopped") from None
    output = done.stdout + done.stderr
    if done.returncode:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise BoardError(f"{name} failed (exit {done.returncode}):\n{tail}")
    return output
