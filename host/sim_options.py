"""The choices of the simulated MoE layer top that a checkpoint does not fix (no dependencies,
so the command line can show the defaults without the simulation extras)."""

from dataclasses import dataclass

__all__ = ["SimOptions"]


@dataclass(frozen=True)
class SimOptions:
    """Hardware choices of ``moefpga run --backend sim``.

    Members
    -------
    lanes : int
        P, rows the engine computes in parallel.
    max_tokens : int
        T_max, the largest batch; tokens are streamed in batches of at most this many.
    slots : int
        On-chip expert slots.
    router_macs : int
        Multiply-accumulate units of the router (at most its rows).
    """
    lanes:       int = 4
    max_tokens:  int = 16
    slots:       int = 2
    router_macs: int = 4
