"""DVC stage: validate params and write the embedded textures dataset."""

from _common import run_stage

from polarocc.config import load_params
from polarocc.pipeline.prepare import run_prepare

if __name__ == "__main__":
    counts = run_stage(lambda: run_prepare(load_params()))
    print({category: sum(n.values()) for category, n in counts.items()})
