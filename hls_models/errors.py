"""The one exception type for mistakes a user can make.

Anything wrong with what the user supplied (a checkpoint, an input array, an option, a shape the
hardware cannot take) raises :class:`MoefpgaError` with one line that names the problem. The
command line prints that line and exits with status 2; any other exception is a bug.
"""


class MoefpgaError(Exception):
    """A user-facing error: bad input, unsupported model, or a shape the hardware cannot hold."""
