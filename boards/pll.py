"""PLL settings that make a board's target clock from its oscillator (iCE40 and ECP5).

The searches follow the constraints of the vendors' PLLs as icepll and ecppll apply them; each
returns the settings with the output frequency nearest the target (the lowest such when two
are equally near) and that frequency.
"""

from .config import BoardError

__all__ = ["ice40_pll", "ecp5_pll"]

#: Largest relative distance between a PLL's output and the target clock.
TOLERANCE = 0.01


def _check(fin, target, best):
    if best is None or abs(best[0] - target) > TOLERANCE * target:
        raise BoardError(f"no PLL setting makes {target:g} MHz from {fin:g} MHz")
    return best[1], best[0]


def ice40_pll(fin, target):
    """``(params, fout)`` of an SB_PLL40 in SIMPLE feedback mode for ``target`` MHz from ``fin``
    MHz: ``fout = fin * (DIVF + 1) / ((DIVR + 1) * 2 ** DIVQ)`` with the phase detector at
    10-133 MHz and the VCO at 533-1066 MHz."""
    best = None
    for divr in range(16):
        fpfd = fin / (divr + 1)
        if not 10 <= fpfd <= 133:
            continue
        for divf in range(128):
            fvco = fpfd * (divf + 1)
            if not 533 <= fvco <= 1066:
                continue
            for divq in range(1, 7):
                fout = fvco / (1 << divq)
                if best is None or abs(fout - target) < abs(best[0] - target):
                    filter_range = next(i for i, top in enumerate(
                        (17, 26, 44, 66, 101, float("inf")), start=1) if fpfd < top)
                    best = (fout, {"DIVR": divr, "DIVF": divf, "DIVQ": divq,
                                   "FILTER_RANGE": filter_range})
    return _check(fin, target, best)


def ecp5_pll(fin, target):
    """``(params, fout)`` of an EHXPLLL with CLKOP fed back for ``target`` MHz from ``fin`` MHz:
    ``fout = fin * CLKFB_DIV / CLKI_DIV`` with the phase detector at 3.125-400 MHz and the VCO
    (``fout * CLKOP_DIV``) at 400-800 MHz, as near 600 MHz as the dividers allow."""
    best = None
    for clki_div in range(1, 129):
        fpfd = fin / clki_div
        if not 3.125 <= fpfd <= 400:
            continue
        for clkfb_div in range(1, 81):
            fout = fpfd * clkfb_div
            dividers = [d for d in range(1, 129) if 400 <= fout * d <= 800]
            if dividers and (best is None or abs(fout - target) < abs(best[0] - target)):
                clkop_div = min(dividers, key=lambda d: abs(fout * d - 600))
                best = (fout, {"CLKI_DIV": clki_div, "CLKFB_DIV": clkfb_div,
                               "CLKOP_DIV": clkop_div, "CLKOP_CPHASE": clkop_div - 1})
    return _check(fin, target, best)
