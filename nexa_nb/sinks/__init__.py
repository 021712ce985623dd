"""Sinks turn training events into output: plain text (`ConsoleSink`) and a live widget
dashboard (`Dashboard`). Neither imports torch."""

from nexa_nb.sinks.console import ConsoleSink
from nexa_nb.sinks.dashboard import Dashboard
from nexa_nb.sinks.render import RunRecord, run_svg, status_text, summary_text

__all__ = ["ConsoleSink", "Dashboard", "RunRecord", "run_svg", "status_text", "summary_text"]
