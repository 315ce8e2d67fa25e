"""rayfp4: pretraining LLMs with NVFP4 on Ray.

Subpackages (imports point down this list, see ARCHITECTURE.md):
``formats`` (reference number formats), ``kernels`` (fast implementations), ``precision`` (the
recipe), ``model``, ``data``, ``train``, ``tracking``; ``config`` and ``run`` on top.
"""

__version__ = "0.1.0"
