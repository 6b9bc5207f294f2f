"""Image parameterizations and regularizers for rendering (activation maximization)."""
