"""The amortized explainer's checkpoint format: what ``cartoonx fit`` writes and every reader checks.

A checkpoint is a plain ``torch.save`` dict read with ``weights_only=True`` (tensors and plain values only):
``state_dict`` holds the mask predictor's weights under :data:`STATE_PREFIX`, and ``checkpoint["cartoonx"]``
(:data:`META_KEY`) the settings it was trained with (classifier identity, image size, wavelet, lambda,
distortion, obfuscation, the network's config under :data:`NETWORK_KEY`, the data split).
"""

from __future__ import annotations

#: Version of the ``checkpoint["cartoonx"]`` settings dict. 2: the network is ``mask_predictor`` (was ``explainer``).
CHECKPOINT_FORMAT = 2
#: The readers accept these versions (older ones are translated on load).
READABLE_FORMATS = (1, 2)
#: ``checkpoint[META_KEY]["kind"]`` of an amortized CartoonX checkpoint.
CHECKPOINT_KIND = "amortized-cartoonx"
META_KEY = "cartoonx"
#: The network's config in the settings dict, and the prefix of its weights in ``state_dict``.
NETWORK_KEY = "mask_predictor"
STATE_PREFIX = "mask_predictor."
#: Format 1 called the network ``explainer``.
LEGACY_NETWORK_KEY = "explainer"
LEGACY_STATE_PREFIX = "explainer."
