"""``rosa study``: a resumable grid of training + evaluation runs and one results table (docs/study.md)."""
from .config import Cell, StudyConfig, StudyConfigError, load_config
from .runner import cell_status, run_cell, run_study, write_results

__all__ = ["Cell", "StudyConfig", "StudyConfigError", "load_config", "cell_status", "run_cell", "run_study",
           "write_results"]
