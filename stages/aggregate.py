"""DVC stage: results table, metrics and plots of the whole sweep."""

import json

from _common import run_stage

from polarocc.config import load_params
from polarocc.pipeline.aggregate import run_aggregate

if __name__ == "__main__":
    print(json.dumps(run_stage(lambda: run_aggregate(load_params())), indent=2))
