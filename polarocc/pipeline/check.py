"""Stage ``check``: decode and validate every file of a dataset before its features are extracted.

Running this as its own stage means a bad file stops ``dvc repro`` before the ``extract`` stage starts,
so DVC never clears the previous feature stores for an input that cannot be used.
"""

from __future__ import annotations

import warnings

from polarocc import layout
from polarocc.atomic import write_json
from polarocc.config import Params, check_datasets_exist
from polarocc.data.mvtec import missing_masks
from polarocc.detector import protocol_a
from polarocc.errors import ConfigError, DataError
from polarocc.features.extract import read_category


def run_check(params: Params, dataset: str, progress: bool = True) -> dict:
    """Read and check every category (Protocol B) or class (Protocol A) of a dataset; write
    reports/checks/<dataset>.json."""
    if dataset in params.protocol_a.datasets:
        return _write(params, dataset, protocol_a.check_dataset(params, dataset, progress))
    if dataset not in params.datasets:
        raise ConfigError(f"dataset {dataset!r} is declared neither under 'datasets' nor 'protocol_a.datasets'")
    check_datasets_exist(params)
    root = layout.dataset_root(params, dataset)
    summary: dict[str, dict] = {}
    for category in params.datasets[dataset].categories:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            samples = read_category(root, category, progress=progress)
        for w in caught:
            print(f"warning: {w.message}")
        anomalous = sum(s.label for s in samples["test"])
        normal = len(samples["test"]) - anomalous
        if not normal or not anomalous:
            missing = "normal (test/good)" if not normal else "defective (test/<defect type>)"
            raise DataError(f"datasets.{dataset} category {category}: {root / category / 'test'} holds no {missing} "
                            "test images; image and pixel ROC AUC need both good and defective test images")
        unmasked = missing_masks(samples["test"])
        if unmasked:
            print(f"note: datasets.{dataset} category {category} is image-level: no mask for "
                  + ", ".join(f"{n} {kind}" for kind, n in sorted(unmasked.items()))
                  + " test image(s) (ground_truth/<defect_type>/<name>_mask.png); its pixel metrics are left out")
        summary[category] = {
            "train": len(samples["train"]),
            "test": len(samples["test"]),
            "test_anomalous": anomalous,
            "warnings": [str(w.message) for w in caught],
            **({"image_level": unmasked} if unmasked else {}),
        }
    return _write(params, dataset, summary)


def _write(params: Params, dataset: str, summary: dict) -> dict:
    write_json(layout.reports(params) / "checks" / f"{dataset}.json", summary, newline=True)
    return summary
