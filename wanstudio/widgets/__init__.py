"""The studio's ipywidgets panels (ipywidgets 8 core controls only, so they render in
JupyterLab, Notebook 7, VS Code and Colab). Every dropdown is generated from ``options.py``.

>>> from wanstudio.widgets import LoadPanel, GeneratePanel, LayoutPanel
>>> load = LoadPanel(); load                      # pick weights and modes, click Load
>>> GeneratePanel(load)                           # image + speech -> video, in a worker thread
>>> LayoutPanel(load)                             # the layout inspector with filters
"""

from .choices import options_markdown
from .generate_panel import GeneratePanel, GenerateRequest, GenerationCancelled, video_widget
from .layout_panel import LayoutPanel
from .load_panel import LoadPanel
from .plots import quant_comparison_plot

__all__ = [
    "GeneratePanel",
    "GenerateRequest",
    "GenerationCancelled",
    "LayoutPanel",
    "LoadPanel",
    "options_markdown",
    "quant_comparison_plot",
    "video_widget",
]
