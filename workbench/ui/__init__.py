"""The interactive face of workbench: a control panel you steer while a run trains, live charts,
a per-token view of the latest batch, and the objective weight-curve explorer.

    from workbench.ui import ControlPanel
    panel = ControlPanel(RunConfig(objective="m2po", staleness=64)); panel.show(); panel.start()

Everything degrades without a frontend (papermill, plain python): training runs in the cell with a
progress bar and the charts are written as PNG to the run directory (``has_frontend``).
"""

from __future__ import annotations

from workbench.notebook import has_frontend
from workbench.ui.live import LiveCharts, Throttle
from workbench.ui.panel import ControlPanel, load_knob_schedule
from workbench.ui.tokens import token_html, token_weights, update_view
from workbench.ui.trainer import BackgroundTrainer

__all__ = ["BackgroundTrainer", "ControlPanel", "LiveCharts", "Throttle", "has_frontend", "load_knob_schedule",
           "token_html", "token_weights", "update_view"]
