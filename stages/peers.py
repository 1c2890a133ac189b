"""DVC stage: PatchCore- and PaDiM-style peers and the untrained projector on the cached features."""

from _common import run_stage

from polarocc.config import load_params
from polarocc.pipeline.peers import run_peers

if __name__ == "__main__":
    run_stage(lambda: run_peers(load_params()))
