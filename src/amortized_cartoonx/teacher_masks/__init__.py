"""Teacher masks: the exact CartoonX optimizer's masks over an image folder, stored for the amortized explainer.

* :mod:`.store` -- :class:`~.store.TeacherMaskStore`, the on-disk store (a manifest and safetensors shards),
  validated as it is read; no Lightning, so training and evaluation can read masks cheaply.
* :mod:`.files` -- reading and checking its two kinds of file (``manifest.json``, safetensors shards): one-line
  ``InputError`` naming a bad file; never runs code.
* :mod:`.plan` -- :class:`~.plan.TeacherMaskSettings`, the manifest, and which images a run computes with
  which seeds (``item_seed(file name, seed)``); no Lightning.
* :mod:`.lightning` -- the predict DataModule, the LightningModule that runs the optimizer, the shard writer.
* :mod:`.generate` -- :func:`~.generate.generate_teacher_masks` (what ``cartoonx targets`` runs) and its summary.

Importing this package imports no module of it, hence not Lightning.
"""
