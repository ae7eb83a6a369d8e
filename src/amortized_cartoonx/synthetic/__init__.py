"""The synthetic cartoon benchmark: procedural images whose decisive object is known, a small classifier for
them, and a folder export with ground-truth masks.

* :mod:`.dataset` -- :class:`SyntheticCartoons` (a torch Dataset, deterministic per item), :class:`CartoonConfig`.
* :mod:`.scenes` -- the shapes, :func:`sample_scene` and :func:`render_scene` (one scene at any size).
* :mod:`.classifier` -- :class:`CartoonCNN`, :func:`load_synthetic_classifier`, :func:`save_synthetic_classifier`.
* :mod:`.classifier_training` -- :func:`train_synthetic_classifier` (PyTorch Lightning, imported only there).
* :mod:`.export` -- :func:`write_synthetic_folder` (PNG images, labels.csv, ground_truth.safetensors).

Importing this package imports neither Lightning nor wandb.
"""
