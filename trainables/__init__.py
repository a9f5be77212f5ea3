"""Everything one trial needs: dataset ingest and cache, splits, models, augmentation,
the train/evaluate engine, metrics and the Ray Tune trainable.

Modules are imported where used (``cxrtune.trainables.models`` and so on) so that
light commands never pay for importing torch.
"""
