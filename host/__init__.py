"""Host runtime and the ``moefpga`` command line."""
