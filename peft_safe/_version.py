"""The package's version, in a leaf module so that any layer can name it (the model card) without a cycle."""

__version__ = "0.2.0"
