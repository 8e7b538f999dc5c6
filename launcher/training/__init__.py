"""The pretraining loop and its parts: schedule, optimizer groups, data order, metrics, checkpoints, signals.

`launcher.pretrain` (the per-process entry point) hands a RunConfig to `trainer.pretrain`.
"""
