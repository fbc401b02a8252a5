"""Commands built on the engine, one job each: ``experiment`` (the main job, ``pathway experiment``), ``dryrun``
(``--dry-run``: a recipe checked and its plan printed, nothing trained), ``rehearse`` (``--rehearse``: a paper
recipe run for real on tiny data in its official layout) and ``partnet_sweep`` (every PartNet category of a
recipe, then the mean). They sit on top of the engine: they import it, and nothing in it imports them (only
``cli.py``, the ``pathway`` command, dispatches here), so the loop reads without them and a new application
goes here. ``demo_data`` stays beside the engine, which writes the demo data itself (``data.demo: true``)."""
