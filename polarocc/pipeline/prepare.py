"""Stage ``prepare``: validate every param and dataset path, then write the embedded textures dataset."""

from __future__ import annotations

import shutil

from polarocc.config import Params, check_backbone_known, check_datasets_exist, resolve
from polarocc.data.textures import TextureSpec, make_textures


def run_prepare(params: Params) -> dict[str, dict[str, int]]:
    """Fail on bad params before anything is computed; then (re)generate ``textures.output``."""
    check_backbone_known(params)
    check_datasets_exist(params)
    t = params.textures
    out = resolve(params, t.output)
    if out.exists():
        shutil.rmtree(out)
    spec = TextureSpec(train=t.train, test_good=t.test_good, defects_per_type=t.defects_per_type,
                       defect_types=t.defect_types, crop=t.crop, image_size=t.image_size)
    return make_textures(out, t.categories, spec, t.seed)
