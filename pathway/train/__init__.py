"""The one training engine for every modality: recipes (config), model, loop (engine), checkpoints, metrics,
MAE pretraining, dry runs. A modality enters only through its adapter and its recipe; see docs/training.md."""
