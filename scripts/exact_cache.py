"""Per-image exact CartoonX results kept between benchmark runs (used by bench_amortized.py and bench_schedule.py).

A result (the mask, the per-step loss history and the measured numbers) is a safetensors file named by the image
file's stem and a digest of everything that changes it: the image's bytes, the classifier's weights and input
normalisation, the optimizer's settings, the image size, the image's own noise seed (the one the optimizer ran
with, derived from the file name and the base seed) and the device type. Two scripts that run the same optimizer
on the same image share the file, so the slow reference (2000 steps) is computed once. Loading reads tensors and
JSON only.

Seconds: ``seconds`` is the wall-clock time per image of the whole ``explain()`` call, the final measurement
included; ``measure_seconds`` is that measurement's share when the computing run timed it (bench_amortized.py
does), else None. Each script subtracts what it needs. A cached result's seconds are those of the run (and
machine) that computed it.

Files written before the key held the image's own seed (it held the base seed, and ``seconds`` meant either the
total or the total less the measurement, depending on the script) are not reused: their names differ from every
key made now. Loaded directly, such a file's ``seconds`` and ``measure_seconds`` are None (unknown).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from amortized_cartoonx.classifiers import classifier_identity, normalization_name
from amortized_cartoonx.optimizer import result_settings as comparable_settings

#: The numbers stored beside the mask and the history.
NUMBERS = (
    "loss",
    "distortion",
    "mask_mean",
    "prob_obfuscated",
    "seconds",
    "measure_seconds",
    "target",
    "prob_original",
)
#: Stored with every file written since ``seconds`` means the whole call (files without it: seconds unknown).
FORMAT = 2


def classifier_key(classifier: torch.nn.Module, spec: str) -> str:
    """The classifier's part of a cache key, by content: the digest of its weights; for a model that keeps its
    weights as constants (a frozen TorchScript file, whose state is empty) the SHA-256 of the file; otherwise the
    spec's text. So ``.gpu/m.pt`` and ``../shared/models/m.pt`` share results when they are the same file."""
    identity = classifier_identity(spec, classifier)
    if identity["classifier_weights_sha256"]:
        return identity["classifier_weights_sha256"]
    if identity["classifier_sha256"]:
        return "file-sha256:" + identity["classifier_sha256"]
    return spec


def result_settings(optimizer) -> dict:
    """The optimizer's settings that change its result (:func:`amortized_cartoonx.optimizer.result_settings`)."""
    return comparable_settings(optimizer.settings())


def cache_path(
    folder: str | None, file: Path, optimizer, identity: str, size: int, seed: int, device: str = "cpu"
) -> Path | None:
    """The cache file of one image's result, or None without a cache folder.

    ``seed`` is the image's own noise seed, the one the optimizer runs it with (``file_seeds``), not the base seed:
    two files with the same bytes but other names (``x.png``, ``x.PNG``) are seeded apart, so they are kept apart.
    The classifier's input normalisation and the device type (CPU and CUDA draw different noise) enter the key
    when they are not ``none`` and ``cpu``.
    """
    if not folder:
        return None
    fields = {
        "image": hashlib.sha256(file.read_bytes()).hexdigest(),
        "classifier": identity,
        "settings": result_settings(optimizer),
        "size": size,
        "image_seed": int(seed),
    }
    normalization = normalization_name(optimizer.classifier)
    if normalization != "none":
        fields["normalization"] = normalization
    if device != "cpu":
        fields["device"] = device
    key = json.dumps(fields, sort_keys=True, default=str)
    return Path(folder) / f"{file.stem}.{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def load_result(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        numbers = json.loads(metadata["numbers"])
        if metadata.get("format") != str(FORMAT):  # an older file: what its seconds left out is not known
            numbers |= {"seconds": None, "measure_seconds": None}
        # cached: its seconds are those of the run (and machine) that computed it
        return {"mask": f.get_tensor("mask"), "history": f.get_tensor("history"), **numbers, "cached": True}


def save_result(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(
        {"mask": record["mask"].contiguous(), "history": record["history"].contiguous()},
        str(tmp),
        metadata={"numbers": json.dumps({k: record[k] for k in NUMBERS}), "format": str(FORMAT)},
    )
    tmp.replace(path)


def cached_results(
    folder: str | None,
    optimizer,
    identity: str,
    size: int,
    batch: torch.Tensor,
    files: list[Path],
    seeds: list[int],
    measure_seconds: float | None = None,
) -> list[dict]:
    """Each image's result: from the cache where it has one, else computed (batched, with a progress bar) and
    cached. ``seeds`` are the images' own seeds (the key holds them). ``seconds`` per image is the whole
    ``explain()`` call, the final measurement included; ``measure_seconds``, when the caller timed the measurement
    (seconds per image), is stored beside it so that a later run can subtract the computing run's own."""
    paths = [cache_path(folder, f, optimizer, identity, size, s, batch.device.type) for f, s in zip(files, seeds)]
    results = [load_result(p) for p in paths]
    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        e = optimizer.explain(batch[todo], seeds=[seeds[i] for i in todo], progress=True).cpu()
        flat = e.mask.flatten()
        for k, i in enumerate(todo):
            summary = e.summary(k)  # the explanation's scalars as plain values
            record = {
                "mask": flat[k],
                "history": e.history.total[:, k],
                "loss": summary["loss_final"],
                **{name: summary[name] for name in NUMBERS if name not in ("loss", "measure_seconds")},
                "measure_seconds": measure_seconds,
            }
            if paths[i] is not None:
                save_result(paths[i], record)
            results[i] = {**record, "cached": False}
    return results
