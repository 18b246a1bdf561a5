"""The package version, in a leaf module: run.json and the CLI stamp it without importing the package."""

__version__ = "0.1.0"
