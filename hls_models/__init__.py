"""NumPy models: the float reference MoE, quantization and M:N pruning, and the bit-accurate
integer model that is the specification of the RTL."""
