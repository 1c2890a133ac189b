"""DVC stage: analysis tables, plots and reports/report.md (polarocc.pipeline.report)."""

from _common import run_stage

from polarocc.config import load_params
from polarocc.pipeline.report import run_report

if __name__ == "__main__":
    run_stage(lambda: run_report(load_params()))
