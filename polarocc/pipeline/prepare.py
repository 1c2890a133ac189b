"""Stage ``prepare``: write the embedded textures dataset (``embedded_data``) as a whole."""

from __future__ import annotations

from polarocc import layout
from polarocc.config import Params
from polarocc.data.textures import TextureSpec, make_textures
from polarocc.ownership import replace_folder


def run_prepare(params: Params) -> dict[str, dict[str, int]]:
    """(Re)generate ``embedded_data.output``: built beside it and swapped in only when complete.

    The folder must lie inside the project and be absent, empty or polarocc's own (see
    :func:`polarocc.ownership.replace_folder`); anything else is refused before anything is written.
    """
    out = layout.embedded_output(params)
    t = params.embedded_data
    spec = TextureSpec(train=t.train, test_good=t.test_good, defects_per_type=t.defects_per_type,
                       defect_types=t.defect_types, crop=t.crop, image_size=t.image_size,
                       variant=t.variant)
    return replace_folder(out, layout.EMBEDDED_KEY, "prepare",
                          lambda staging: make_textures(staging, t.categories, spec, t.seed),
                          layout.recorded_outputs(params.root, "prepare"))
