"""Detection at scale on Ray (the ``scale`` extra): batch detection over many images with Ray Data
(:mod:`ppfuse.scale.batch`), a detection service with Ray Serve (:mod:`ppfuse.scale.serve`) and its HTTP
client (:mod:`ppfuse.scale.client`); :mod:`ppfuse.scale.worker` is what each actor or replica runs,
:mod:`ppfuse.scale.cluster` the Ray cluster they run on. Imports no PaddleDetection; ray is imported where a
job runs (and by :mod:`ppfuse.scale.serve`)."""
