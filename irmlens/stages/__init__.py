"""The study's stages, one module each. Each reads earlier stages' files through ``RunPaths``,
calls the libraries below (which know nothing of run folders) and writes its own files; its
``run(ctx)``, ``outputs(paths)`` and, where the outputs' presence is not enough, ``done(ctx)``
are listed in order in ``irmlens.pipeline.STAGES``."""
