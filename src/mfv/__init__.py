"""mfv: Multifaceted Feature Visualization for PyTorch vision models."""

__version__ = "0.1.0"
