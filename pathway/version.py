"""The package version, in a module of its own so that modules of the package (provenance records) can read it
without importing the package's ``__init__`` (an import circle)."""

__version__ = "0.1.0"
