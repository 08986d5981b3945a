import numpy as np

from job import plots
from job.layout import RunLayout

TEST_SETS = ("seeded_test", "mnist_test")


def fake_models(matrix: np.ndarray) -> dict:
    scores = {"confusion_matrix": matrix.tolist(), "accuracy": 0.9876}
    return {name: {test_set: scores for test_set in TEST_SETS} for name in ("baseline", "vat")}


def test_confusion_matrices_show_every_count_legibly_inside_its_cell():
    # The widest counts a run can meet: four digits on the diagonal (1,135 ones in MNIST's test set).
    matrix = np.eye(10, dtype=int) * 1135 + np.arange(100).reshape(10, 10)
    fig = plots.confusion_figure(fake_models(matrix), "mnist_test")
    fig.set_dpi(plots.DPI)  # the resolution it is saved at
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        counts = list(ax.texts)
        assert sorted(int(text.get_text()) for text in counts) == sorted(matrix.ravel().tolist())
        assert min(text.get_fontsize() for text in counts) >= 9, "pt: legible at 100 % zoom"
        cell_px = abs(ax.transData.transform((1, 0))[0] - ax.transData.transform((0, 0))[0])
        assert max(text.get_window_extent(renderer).width for text in counts) < 0.9 * cell_px


def test_plots_are_written_for_both_test_sets(tmp_path):
    paths = plots.plot_confusion_matrices(RunLayout(tmp_path), fake_models(np.eye(10, dtype=int) * 100))
    assert [p.name for p in paths] == ["confusion_seeded_test.png", "confusion_mnist_test.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
