"""Run the ``moefpga`` command line in process, for the command-line tests."""

import contextlib
import io

from moefpga.host import cli


def main(*args):
    """``moefpga`` in process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()
