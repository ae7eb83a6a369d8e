"""Which cues the synthetic benchmark's classifier decides by: held-out scenes re-rendered with parts left out or
changed, and its accuracy on each.

    python scripts/bench_synthetic_cues.py --classifier synthetic --count 500

The scenes are items 0..count-1 of the ``test`` split (never trained on) at ``--size``; every variant keeps the
scene's pixel noise. Variants:

- ``as generated``;
- ``decisive object removed``, ``distractors removed``, ``background only``;
- ``object without its outline``: the decision rule's cue (the outline) taken away, the object kept;
- ``outline moved to a distractor``: the object loses its outline and the first distractor gets it (in the
  object's outline colour): a classifier that follows the rule now names the distractor's class.

For each: the accuracy against the decisive object's class, the mean softmax probability of that class, and the
share of predictions naming the first distractor's class. A scene whose distractors could not be placed has none:
it is left out of that share and of the last variant (the table says how many scenes each row has). The CartoonX
masks of this benchmark are scored against the decisive object's pixels (``docs/evaluation.md``, localisation):
that is a fair ground truth when the object removed takes the accuracy to chance and the distractors removed
leave it.
Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
import warnings
from collections.abc import Callable

import torch

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

from amortized_cartoonx.classifiers import load_classifier  # noqa: E402
from amortized_cartoonx.cli.common import plain_text  # noqa: E402
from amortized_cartoonx.errors import CartoonXError  # noqa: E402
from amortized_cartoonx.synthetic.dataset import CartoonConfig, SyntheticCartoons  # noqa: E402
from amortized_cartoonx.synthetic.scenes import Scene, render_scene  # noqa: E402

#: variant name -> (scene -> the scene to draw, draw the object, draw the distractors)
VARIANTS: dict[str, tuple[Callable[[Scene], Scene], bool, bool]] = {
    "as generated": (lambda s: s, True, True),
    "decisive object removed": (lambda s: s, False, True),
    "distractors removed": (lambda s: s, True, False),
    "background only": (lambda s: s, False, False),
    "object without its outline": (lambda s: dataclasses.replace(s, object=_without_outline(s.object)), True, True),
    "outline moved to a distractor": (lambda s: _outline_moved(s), True, True),
}


def _without_outline(shape):
    return dataclasses.replace(shape, outline=None)


def _outline_moved(scene: Scene) -> Scene:
    """The object without its outline, the first distractor with it."""
    first = dataclasses.replace(scene.distractors[0], outline=scene.object.outline)
    return dataclasses.replace(
        scene, object=_without_outline(scene.object), distractors=[first, *scene.distractors[1:]]
    )


def render_variant(scene: Scene, config: CartoonConfig, variant: str) -> torch.Tensor:
    """The ``(3, S, S)`` image of ``scene`` under ``variant`` (a key of :data:`VARIANTS`)."""
    change, draw_object, draw_distractors = VARIANTS[variant]
    image, _, _ = render_scene(change(scene), config, draw_object=draw_object, draw_distractors=draw_distractors)
    return image


def measure(classifier, data: SyntheticCartoons, batch: int = 100) -> dict[str, dict[str, float]]:
    """Per variant: ``accuracy`` and ``p_label`` (the decisive object's class), ``names_distractor`` (the share
    naming the first distractor's class, over the scenes that have one) and ``scenes`` (the scenes measured:
    all of ``data``, or those with a distractor for the variant that moves the outline to it)."""
    all_scenes = [data.scene(i) for i in range(len(data))]
    out: dict[str, dict[str, float]] = {}
    for variant in VARIANTS:
        needs_distractor = variant == "outline moved to a distractor"
        scenes = [s for s in all_scenes if s.distractors or not needs_distractor]
        if not scenes:
            continue
        labels = torch.tensor([s.label for s in scenes])
        has = torch.tensor([bool(s.distractors) for s in scenes])
        distractor_labels = torch.tensor([s.distractors[0].label if s.distractors else -1 for s in scenes])
        probs = []
        for lo in range(0, len(scenes), batch):
            images = torch.stack([render_variant(s, data.config, variant) for s in scenes[lo : lo + batch]])
            with torch.no_grad():
                probs.append(torch.softmax(classifier(images).float(), dim=1))
        p = torch.cat(probs)
        predicted = p.argmax(1)
        named = (predicted == distractor_labels)[has]
        out[variant] = {
            "accuracy": float((predicted == labels).float().mean()),
            "p_label": float(p.gather(1, labels[:, None]).mean()),
            "names_distractor": float(named.float().mean()) if len(named) else float("nan"),
            "scenes": len(scenes),
        }
    return out


def table(results: dict[str, dict[str, float]], chance: float) -> str:
    rows = [
        f"| image | scenes | accuracy (chance {chance:.1%}) | mean p(label) | names the first distractor's class |",
        "|---|---|---|---|---|",
    ]
    for variant, r in results.items():
        rows.append(
            f"| {variant} | {r['scenes']} | {r['accuracy']:.1%} | {r['p_label']:.3f} | {r['names_distractor']:.1%} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=plain_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--classifier", default="synthetic", metavar="SPEC", help="default: synthetic")
    parser.add_argument("--count", type=int, default=500, help="test scenes (default 500)")
    parser.add_argument("--size", type=int, default=64, help="image side (default 64, the classifier's)")
    parser.add_argument("--seed", type=int, default=0, help="the test split's dataset seed (default 0)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        classifier = load_classifier(args.classifier)
    except CartoonXError as exc:  # e.g. no trained synthetic classifier here: cartoonx train-classifier
        parser.error(str(exc))
    data = SyntheticCartoons(args.count, size=args.size, seed=args.seed, split="test")
    start = time.perf_counter()
    results = measure(classifier, data)
    seconds = time.perf_counter() - start
    print(table(results, 1 / len(data.class_names)))
    record = {
        "classifier": args.classifier,
        "count": args.count,
        "size": args.size,
        "seed": args.seed,
        "results": results,
        "seconds": round(seconds, 1),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
