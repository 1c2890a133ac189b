"""DVC stage: cosines, training-budget curves, t-SNE and overlays (polarocc.pipeline.analyze)."""

from _common import run_stage

from polarocc.config import load_params
from polarocc.pipeline.analyze import run_analyze

if __name__ == "__main__":
    run_stage(lambda: run_analyze(load_params()))
