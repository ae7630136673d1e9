"""Sphinx configuration of the skattr documentation site.

Build it with ``bash docs/build.sh`` (warnings are errors); the pages are the markdown user
guide in this folder (read by MyST), the API reference generated from the numpydoc docstrings
(``api/``) and the sphinx-gallery examples (``../examples``), which run during the build.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, os.fspath(HERE.parent))

import skattr  # noqa: E402

project = "skattr"
author = "the skattr developers"
copyright = "the skattr developers"
release = version = skattr.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
# index.md is the landing page on GitHub; index.rst includes it and adds the table of contents.
exclude_patterns = ["_build", "index.md", "**.ipynb_checkpoints", "auto_examples/*.md5",
                    "auto_examples/*.py", "auto_examples/*.ipynb", "auto_examples/*.zip"]
templates_path = ["_templates"]

# The user pages link to each other as ``[TorchModel](TorchModel.md)``; MyST resolves those to
# documents (a link to a missing page is a warning, so an error here).
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
myst_url_schemes = ["http", "https", "mailto"]

# API reference
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "inherited-members": False}
autodoc_typehints = "none"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# Examples: run during the build, one figure per example at least, every example must pass.
sphinx_gallery_conf = {
    "examples_dirs": os.fspath(HERE.parent / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "within_subsection_order": "FileNameSortKey",  # plot_01_..., plot_02_...: reading order
    "only_warn_on_example_error": False,
    "abort_on_example_error": False,
    "download_all_examples": False,
    "remove_config_comments": True,
    "reset_modules": ("matplotlib", "seaborn"),
    "capture_repr": ("_repr_html_", "__repr__"),
    "min_reported_time": 1,
    "show_memory": False,
    "doc_module": ("skattr",),
    "backreferences_dir": "gen_modules/backreferences",
}

def _skip_members(app, what, name, obj, skip, options):
    # sklearn's generated metadata-routing setters (set_fit_request, ...) are documented there
    if name.startswith("set_") and name.endswith("_request"):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_members)


html_theme = "alabaster"
html_theme_options = {
    "page_width": "1240px",
    "sidebar_width": "240px",
    "description": "Training-data attribution and neural-network kernels as scikit-learn estimators",
    "fixed_sidebar": True,
}
html_title = "skattr"
html_static_path = ["_static"]
html_show_sourcelink = False

warnings.filterwarnings("ignore", category=UserWarning, message="Matplotlib is currently using agg")
# The examples run in this process. Their networks are tiny: with more than one thread torch
# spends most of its time synchronising (a gallery example took 5-20x the CPU time on 2 busy
# cores), so the build uses one.
import torch  # noqa: E402

torch.set_num_threads(1)
