"""NumPy models: float reference MoE, quantization and M:N pruning, the bit-accurate integer model."""
