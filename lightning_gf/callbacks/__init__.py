"""The Lightning wiring: one thin callback over :func:`lightning_gf.apply_gradient_filter`, for
``pytorch_lightning`` (:mod:`.pytorch_lightning`) and ``lightning.pytorch`` (:mod:`.lightning`)."""
