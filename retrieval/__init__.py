"""Core of the image-retrieval engine: data, evaluation, configs and the CLI.

Importing this package has no side effects; the heavy stages (models, training,
indexing, serving) are separate top-level packages that build on it.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
