"""The random streams and the item hash are pinned: changing them changes every result, so it is deliberate."""

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
