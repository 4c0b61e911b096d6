"""The application: the ``lightning-gf`` CLI, the demo, the recipes' task modules (``models``)
and data modules (``data``)."""
