"""The method, once: :class:`Detector` (fit / score / anomaly_maps / predict / save / load) and what the pipeline
runs on cached feature stores (:mod:`.stores`, :mod:`.model_files`, :mod:`.curves`, :mod:`.protocol_a`)."""

from polarocc.detector.detector import Detector

__all__ = ["Detector"]
