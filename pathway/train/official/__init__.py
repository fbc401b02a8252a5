"""The official code bases' file formats, both ways: ``layouts`` reads their checkpoints (MAE, VideoMAE,
AudioMAE, Point-MAE, timm, Hugging Face ViT, M2PT aux) into the engine's ``TransformerModel`` with exact key
checks (docs/checkpoints.md), ``dense_export`` writes a folded ViT as the backbone file of detectron2's ViTDet or
mmsegmentation's MAE, and ``fixtures`` writes tiny data sets and checkpoint files in their layouts for
``--rehearse``. Apart from the engine because these modules follow someone else's key names and folders, not
ours: when an upstream layout changes, this folder is what changes. They import nothing from the engine; the
engine reads foreign checkpoints through ``layouts``."""
