"""rayfp4: pretraining LLMs with NVFP4 on Ray.

Subpackages: ``formats`` (reference number formats), ``kernels`` (fast implementations and the
backend registry), ``precision`` (the recipe), ``model``, ``data``, ``tracking``, ``train`` (driver
and workers); ``config`` (the run's schema) and ``run`` (the CLI) on top; ``yamlfile``,
``console`` and ``fileio`` are utilities anyone may import. Which package may import which: docs/architecture.md.
"""

__version__ = "0.1.0"
