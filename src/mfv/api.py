"""The Python API: `mfv.visualize` renders one target's pictures from a model in memory."""
