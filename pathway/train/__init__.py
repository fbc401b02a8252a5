"""The one training engine for every modality: recipes (config), model, loop (engine), checkpoints, metrics,
MAE pretraining, and the ``pathway`` command (cli). A modality enters only through its adapter and its recipe; see
docs/training.md. What is not the loop itself lives in three subpackages, so this folder reads as the engine:
``cluster`` (what a multi-process, preemptible run adds), ``official`` (the official code bases' checkpoint key
layouts and files written in them) and ``jobs`` (commands built on the engine: the main experiment, dry runs,
rehearsals, the PartNet sweep)."""
