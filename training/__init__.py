"""Training: losses, optimiser and schedule, the trainer loop and its recipes.

Import the submodules directly (``training.trainer``, ``training.losses``...): this package file
imports nothing, so importing one part never builds or loads another.
"""

__all__: list[str] = []
