"""Datasets with hierarchical labels, preprocessing, batch samplers and the synthetic hierarchical dataset.

Import the submodules directly (``retrieval.data.datasets``, ``retrieval.data.transforms``...): this package
file stays empty of imports so that ``import retrieval.data.labels`` does not pull in torch or PIL.
"""

__all__: list[str] = []
