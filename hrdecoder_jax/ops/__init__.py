"""Compiled kernels the model uses where XLA's own are slow (``conv``: oneDNN convolutions on CPUs)."""
