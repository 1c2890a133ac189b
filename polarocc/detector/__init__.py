"""The method, once: :class:`polarocc.detector.detector.Detector` (fit / score / anomaly_maps / predict / save /
load; ``polarocc.Detector``) and what the pipeline runs on cached feature stores (:mod:`.stores`,
:mod:`.model_files`, :mod:`.curves`, :mod:`.protocol_a`). Nothing is imported here, so a stage that only needs
the store functions does not depend on the Detector's code."""
