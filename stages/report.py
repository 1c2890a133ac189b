"""DVC stage: the results table and ``dvc exp show`` metrics of the whole sweep (polarocc.pipeline.aggregate),
then the analysis tables, plots and reports/report.md (polarocc.pipeline.report)."""

import json

from _common import run_stage

from polarocc.config import load_params
from polarocc.pipeline.aggregate import run_aggregate
from polarocc.pipeline.report import run_report


def main() -> dict:
    params = load_params()
    metrics = run_aggregate(params)
    run_report(params)
    return metrics


if __name__ == "__main__":
    print(json.dumps(run_stage(main), indent=2))
