"""scripts/bench_schedule.py: candidates checked before anything runs, one-line errors, an untimed warm-up, the
paper row's cached seconds said, the summary and the plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from amortized_cartoonx.errors import ConfigError
from amortized_cartoonx.optimizer import CartoonX

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # the classifier spec imports conftest.make_tiny_cnn
    sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent / "scripts"))
import bench_schedule as bench  # noqa: E402

SPEC = "conftest:make_tiny_cnn"
BASE = {"num_samples": 2, "measure_samples": 2, "seed": 0}


@pytest.fixture
def folder(tmp_path) -> Path:
    """Two 32 px images."""
    gen = torch.Generator().manual_seed(4)
    for i in range(2):
        pixels = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"im{i}.png")
    return tmp_path


def tiny(folder: Path, *options: str) -> list[str]:
    return [
        "--classifier",
        SPEC,
        "--normalize",
        "none",
        "--images",
        str(folder),
        "--size",
        "32",
        "--levels",
        "2",
        "--samples",
        "2",
        "--measure-samples",
        "2",
        "--paper-steps",
        "3",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--threads",
        "1",
        *options,
    ]


def test_candidate_names_take_an_lr_in_scientific_notation():
    config = bench.candidate_config("constant-1e-3", 10, BASE)
    assert (config.lr, config.lr_decay, config.lr_final) == (1e-3, "constant", 0.0)
    config = bench.candidate_config("logit-cosine-3e-1-0.2~2-4+bf16", 10, BASE)
    assert (config.lr, config.lr_decay, config.lr_final, config.parametrisation) == (0.3, "cosine", 0.2, "logit")
    assert (config.precision, config.num_samples, config.final_samples) == ("bf16", 2, 4)
    assert bench.candidate_config("linear-2.5E+1", 10, BASE).lr == 25.0
    assert bench.candidate_config("fast", 10, BASE).steps == 10
    for bad in ("constant-1e", "cosine", "bogus-0.1", "fast+fp8", "constant-0.1-x"):
        with pytest.raises(ConfigError, match="unknown"):
            bench.candidate_config(bad, 10, BASE)


def test_every_candidate_and_budget_is_checked_before_anything_runs(folder, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("ran before every candidate was checked")

    monkeypatch.setattr(bench, "cached_results", refuse)
    monkeypatch.setattr(CartoonX, "explain", refuse)
    for candidates, steps, needle in (
        ("fast,constant-1e-3,bogus-0.1", "2", "unknown candidate 'bogus-0.1'"),
        ("fast", "2,x", "--steps"),
        ("constant-0", "2", "lr must be positive"),  # a setting the optimizer refuses
    ):
        assert bench.main(tiny(folder, "--candidates", candidates, "--steps", steps)) == 2
        err = capsys.readouterr().err
        assert err.startswith("bench_schedule: error: ") and needle in err and len(err.splitlines()) == 1


def test_an_offset_past_the_folder_and_a_package_error_are_one_line_errors(folder, tmp_path, capsys):
    assert bench.main(tiny(folder, "--offset", "5", "--candidates", "fast")) == 2
    err = capsys.readouterr().err
    assert "--offset 5" in err and "has 2 images" in err and "Traceback" not in err
    assert bench.main(tiny(tmp_path / "missing", "--candidates", "fast")) == 2
    assert capsys.readouterr().err.strip().startswith("bench_schedule: error: not a folder")


def test_a_warm_up_runs_before_the_timed_candidates_and_cached_seconds_are_said(folder, tmp_path, monkeypatch, capsys):
    """With the reference from the cache, nothing ran before the first timed candidate, which paid the one-time
    costs; the paper row's seconds come from the cache, and the output says so."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    args = tiny(folder, "--candidates", "constant-1e-3", "--reference-cache", str(cache))
    assert bench.main([*args, "--json", str(out / "first.json")]) == 0
    assert "from the reference cache" not in capsys.readouterr().out

    events: list[str] = []
    explain, run = CartoonX.explain, bench.run
    monkeypatch.setattr(CartoonX, "explain", lambda self, *a, **k: events.append("explain") or explain(self, *a, **k))
    monkeypatch.setattr(bench, "run", lambda *a, **k: events.append("timed") or run(*a, **k))
    assert bench.main([*args, "--json", str(out / "second.json")]) == 0
    assert events.index("explain") < events.index("timed")  # the warm-up
    assert "the seconds of 2/2 images come from the reference cache" in capsys.readouterr().out
    first, second = (json.loads((out / name).read_text())["paper"] for name in ("first.json", "second.json"))
    assert (first["seconds_cached"], second["seconds_cached"]) == (0, 2)
    assert second["seconds_per_image"] == pytest.approx(first["seconds_per_image"])  # the computing run's


def test_the_summary_says_when_no_budget_tried_reaches_the_paper_loss():
    rows = [{"schedule": "fast", "steps": s, "median_ratio": r} for s, r in ((25, 1.3), (50, 1.01), (100, 0.99))]
    assert bench.reached("fast", rows) == "fast: median ratio <= 1 from 100 steps"
    assert bench.reached("fast", rows[:2]) == "fast: median ratio <= 1 not reached at the budgets tried (25, 50 steps)"


def test_the_plot_puts_the_loss_after_s_steps_at_s_and_names_the_papers_steps(tmp_path, monkeypatch):
    import amortized_cartoonx.plotting as plotting

    figures = []
    monkeypatch.setattr(plotting, "save_figure", lambda fig, path: figures.append(fig))
    paper = [20.0 - 0.5 * s for s in range(30)]  # history[s]: the loss after s steps
    result = {
        "paper": {"steps": 30, "losses": [4.0, 5.0]},
        "curves": {"paper": paper, "fast@5": [20.0, 10.0, 8.0, 7.0, 6.5]},
        "rows": [{"schedule": "fast", "steps": 5, "median_ratio": 1.2}],
    }
    bench.plot(result, str(tmp_path / "p.png"))
    ax_curve, ax_ratio = figures[0].axes
    lines = {line.get_label(): line for line in ax_curve.get_lines()}
    paper_line = lines["paper (30 steps)"]
    assert list(paper_line.get_xdata()[:2]) == [1, 2] and list(paper_line.get_ydata()[:2]) == paper[1:3]
    assert list(lines["fast@5"].get_xdata()) == [1, 2, 3, 4] and lines["fast@5"].get_ydata()[0] == 10.0
    assert ax_ratio.get_ylabel() == "final loss / paper's 30-step loss"
