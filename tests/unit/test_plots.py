"""Loss-curve plots from metrics.jsonl: the figure's lines (one set per run), the EMA, the PNG
written atomically, and ``dstrain plot``."""

from __future__ import annotations

import json
import math

import pytest

from launcher.cli import main as cli_main
from trainer.plots import ema, loss_figure, plot_metrics, read_metrics


def write_run(run_dir, first_step: int, last_step: int, eval_every: int = 50) -> None:
    """A metrics.jsonl as the trainer writes it: step records every 10 steps, eval records."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(first_step, last_step + 1, 10):
        loss = 8.0 * math.exp(-step / 60) + 2.0 + 0.1 * ((step // 10) % 3)
        lines.append(
            {"step": step, "epoch": 0, "loss": loss, "lr": 1e-3 * min(1.0, step / 30), "tokens_per_s": 1e4}
        )
        if step % eval_every == 0:
            lines.append({"step": step, "eval_loss": loss - 0.05, "eval_ppl": math.exp(loss)})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_ema_is_debiased_and_follows_the_smoothing_weight():
    # s1 = 0.5 * 4 / (1 - 0.5) = 4; s2 = (0.5 * 2 + 0.5 * 2) / (1 - 0.25) = 2.667
    assert ema([4.0, 2.0], 0.5) == pytest.approx([4.0, 8 / 3])
    assert ema([3.0, 1.0, 5.0], 0.0) == [3.0, 1.0, 5.0]


def test_overlay_draws_each_runs_curves_with_its_name(tmp_path):
    write_run(tmp_path / "original", 10, 200)
    write_run(tmp_path / "resumed", 110, 300)
    runs = [read_metrics(tmp_path / "original"), read_metrics(tmp_path / "resumed")]
    assert [r.name for r in runs] == ["original", "resumed"]
    assert len(runs[0].train) == 20 and len(runs[0].evals) == 4 and len(runs[0].lr) == 20
    fig = loss_figure(runs, smoothing=0.6)
    ax, ax_lr = fig.axes
    labels = [line.get_label() for line in ax.get_lines()]
    for name in ("original", "resumed"):
        for series in ("train loss", "train loss (EMA 0.6)", "eval loss"):
            assert labels.count(f"{name}: {series}") == 1, (name, series, labels)
    assert [line.get_label() for line in ax_lr.get_lines()] == ["original: lr", "resumed: lr"]
    smoothed = next(line for line in ax.get_lines() if line.get_label() == "resumed: train loss (EMA 0.6)")
    raw = [loss for _, loss in runs[1].train]
    assert list(smoothed.get_xdata()) == [step for step, _ in runs[1].train]
    assert list(smoothed.get_ydata()) == pytest.approx(ema(raw, 0.6))
    assert ax.get_legend() is not None and len(ax.get_legend().get_texts()) == 8
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_single_run_labels_have_no_prefix_and_png_is_written_atomically(tmp_path):
    write_run(tmp_path / "run", 10, 100)
    fig = loss_figure([read_metrics(tmp_path / "run")])
    assert sorted(line.get_label() for line in fig.axes[0].get_lines()) == [
        "eval loss",
        "train loss",
        "train loss (EMA 0.6)",
    ]
    png = plot_metrics([tmp_path / "run"], tmp_path / "out" / "curve.png")
    assert png == tmp_path / "out" / "curve.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert [p.name for p in png.parent.iterdir()] == ["curve.png"], "no temporary file left behind"


def test_runs_with_the_same_directory_name_are_told_apart(tmp_path):
    write_run(tmp_path / "a" / "run", 10, 50)
    write_run(tmp_path / "b" / "run", 10, 50)
    fig_path = plot_metrics([tmp_path / "a" / "run", tmp_path / "b" / "run"], tmp_path / "x.png")
    assert fig_path.is_file()
    from trainer.plots import run_names

    assert run_names([tmp_path / "a" / "run", tmp_path / "b" / "run"]) == [
        str(tmp_path / "a" / "run"),
        str(tmp_path / "b" / "run"),
    ]


def test_dstrain_plot_cli(tmp_path, capsys, monkeypatch):
    write_run(tmp_path / "r1", 10, 100)
    write_run(tmp_path / "r2", 10, 100)
    assert cli_main(["plot", str(tmp_path / "r1")]) == 0
    assert (tmp_path / "r1" / "loss_curve.png").is_file()
    monkeypatch.chdir(tmp_path)
    assert cli_main(["plot", str(tmp_path / "r1"), str(tmp_path / "r2")]) == 0
    assert (tmp_path / "loss_compare.png").is_file()
    capsys.readouterr()
    assert cli_main(["plot", str(tmp_path / "missing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert cli_main(["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "e.png")]) == 2
    assert "nothing to draw" in capsys.readouterr().err and not (tmp_path / "e.png").exists()
