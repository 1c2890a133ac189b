"""DVC stage: check the backbone name, its feature levels and its weights (only when backbone params change)."""

from _common import run_stage

from polarocc.config import load_params
from polarocc.pipeline.validate import run_validate_backbone

if __name__ == "__main__":
    run_stage(lambda: run_validate_backbone(load_params()))
