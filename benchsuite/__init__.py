"""benchsuite: a frozen, plugin-based benchmark for prompt learning on CLIP-style models."""

__version__ = "0.1.0"
