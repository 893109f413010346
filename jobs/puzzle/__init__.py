"""Puzzle on Kubernetes: inference-optimized child LLMs (arXiv 2411.19146)."""

__version__ = "0.1.0"
