"""The package version; the code generators stamp it into every generated module."""
__version__ = "0.1.0"
