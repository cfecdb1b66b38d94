"""Operator tools: ``ray-cml init``, ``doctor``, ``status`` and ``gc``."""
