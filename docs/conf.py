"""Sphinx configuration: the guides and method pages are Markdown (MyST), the API reference is generated
from the docstrings (autodoc). ``make docs`` builds it with warnings as errors."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "lossbench"
author = "the lossbench authors"
copyright = "2026, the lossbench authors"
release = "0.1.0"

extensions = [
    "myst_parser",  # Markdown pages (the README's sections moved here are Markdown)
    "sphinx.ext.autodoc",  # the API reference from the docstrings
    "sphinx.ext.napoleon",  # 'Args:' / 'Returns:' sections where a docstring has them
    "sphinx.ext.mathjax",  # :math: roles and $...$ in the pages
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
exclude_patterns = ["_build"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
# The compiled extension and CUDA are optional at documentation time.
autodoc_mock_imports = ["lossbench_cce_ext"]

html_theme = "alabaster"
html_title = "lossbench"
