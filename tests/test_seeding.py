"""The random streams and the item hash are pinned: changing them changes every result, so it is deliberate."""

import numpy as np
import pytest
import torch

from amortized_cartoonx.errors import InputError
from amortized_cartoonx.seeding import Stream, file_seeds, image_seeds, item_seed, item_unit, step_seeds, stream_seeds


def test_the_stream_table_is_pinned():
    assert {s.name: int(s) for s in Stream} == {
        "OPTIMIZE": 0,
        "MEASURE": 1,
        "EVAL_NOISE": 10,
        "EVAL_TIES": 11,
        "SMOOTHGRAD": 20,
        "RANDOM_ORDER": 21,
        "TRAIN_NOISE": 30,
        "VAL_NOISE": 31,
        "TEST_NOISE": 32,
        "AUGMENT": 33,
        "TRAIN_ORDER": 34,
        "CALIBRATE": 40,
        "SANITY": 50,
    }


def test_the_item_hash_is_pinned_and_depends_on_the_id_and_seed_only():
    assert item_seed("a.png", 0) == 9089916201048199586
    assert item_seed("a.png", 0) != item_seed("b.png", 0) != item_seed("a.png", 1)
    assert 0 <= item_seed("x", 123) < 2**63
    assert 0.0 <= item_unit("a.png", 0) < 1.0
    assert file_seeds(["a.png", "b.png"], 7) == [item_seed("a.png", 7), item_seed("b.png", 7)]


def test_streams_are_independent_and_reproducible():
    seeds = [1, 2, 3]
    assert stream_seeds(seeds, Stream.OPTIMIZE) == stream_seeds(seeds, Stream.OPTIMIZE)
    assert stream_seeds(seeds, Stream.OPTIMIZE) != stream_seeds(seeds, Stream.MEASURE)
    assert stream_seeds(seeds, Stream.OPTIMIZE)[1:] == stream_seeds(seeds[1:], Stream.OPTIMIZE)


def test_step_seeds_depend_on_step_stream_and_image_not_on_the_batch():
    first = step_seeds(0, Stream.TRAIN_NOISE, 3, ["a.jpg", "b.jpg"])
    assert step_seeds(0, Stream.TRAIN_NOISE, 3, ["b.jpg"])[0] == first[1]
    assert first != step_seeds(0, Stream.TRAIN_NOISE, 4, ["a.jpg", "b.jpg"])
    assert first != step_seeds(0, Stream.VAL_NOISE, 3, ["a.jpg", "b.jpg"])


def test_image_seeds_of_the_python_api():
    assert image_seeds(3, 5) == [5, 6, 7]
    assert image_seeds(2, 5, seeds=[9, 4]) == [9, 4]


@pytest.mark.parametrize(
    "seeds, needle",
    [
        (["a", "b"], "seeds must be non-negative integers, got 'a'"),
        ([-1, 2], "seeds must be non-negative integers, got -1"),  # numpy's SeedSequence refuses it deep inside
        ([1.5, 2], "seeds must be non-negative integers, got 1.5"),  # was truncated to 1 silently
        ([True, 2], "got True"),
        (7, "seeds must be one integer per image, got int"),
    ],
)
def test_seeds_must_be_non_negative_integers(seeds, needle):
    with pytest.raises(InputError, match=needle):
        image_seeds(2, 0, seeds)


def test_integer_seeds_of_every_kind_are_accepted_and_a_negative_base_seed_is_named():
    assert image_seeds(3, 0, [np.int64(4), torch.tensor(5), 6.0]) == [4, 5, 6]
    assert image_seeds(2, 0, torch.tensor([8, 9])) == [8, 9]
    with pytest.raises(InputError, match=r"seed must be at least 0 \(image n is seeded seed \+ n\), got -1"):
        image_seeds(2, -1)
    assert image_seeds(2, -1, [0, 1]) == [0, 1]  # explicit seeds need no base seed
