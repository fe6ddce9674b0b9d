"""The offline main job, ``clipforge demo``, in one wing.

``sources.py`` installs the real image sources (Debian and npm packages), ``records.py`` reads
their names and captions, ``dataset.py`` renders and splits them into training, held-out and
zero-shot evaluation sets, ``run.py`` trains and evaluates with the real ``train`` and
``evaluate`` code (``run_folder.py``: which run a folder holds and how far it got), and
``report.py`` draws and prints what a person sees.
"""
from .run import DEFAULT_MINUTES, DEFAULT_MODEL, DemoResult, evaluate_demo, run_demo
from .report import format_results

__all__ = ["DEFAULT_MINUTES", "DEFAULT_MODEL", "DemoResult", "evaluate_demo", "format_results", "run_demo"]
