"""Ray cluster launcher for Cloudera Machine Learning: nodes are CML applications."""

__version__ = "0.1.0"
