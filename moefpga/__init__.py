"""moefpga: Mixture-of-Experts inference on FPGAs.

The subpackages map onto the project's top-level folders: ``moefpga.rtl`` (gateware),
``moefpga.hls_models`` (NumPy models), ``moefpga.host`` (runtime and command line) and
``moefpga.boards`` (board tops).
"""
