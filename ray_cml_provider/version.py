"""The package's version, in a module of its own so that every floor can read it without
importing the package's facade (``ray_cml_provider/__init__.py``), which sits on top."""

__version__ = "0.1.0"
