"""Offline ``evaluate`` metric modules shipped with hf_fedlora, loadable by path.

``GLUE_METRIC_PATH`` is the file to pass to ``evaluate.load(GLUE_METRIC_PATH, config_name=task)``.
"""

from __future__ import annotations

from pathlib import Path

GLUE_METRIC_PATH = str(Path(__file__).with_name("glue.py"))


def load_glue_metric(config_name: str, **kwargs):
    """``evaluate.load`` of the offline GLUE metric for ``config_name`` (a GLUE task or ``multiclass``)."""
    import evaluate

    return evaluate.load(GLUE_METRIC_PATH, config_name=config_name, **kwargs)


__all__ = ["GLUE_METRIC_PATH", "load_glue_metric"]
