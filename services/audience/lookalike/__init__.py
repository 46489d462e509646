"""Lookalike expansion: user features (``features``), MiniBatchKMeans models (``model``), seed
expansion (``expand``), the train/expand pipeline shared by the RPCs and the CLI (``pipeline``)
and the ``LookalikeService`` (``service``, served by the audience process)."""
