"""Figures: a title naming model, dtype and machine; log axes whose tick labels do not collide."""

from latentkv.io.plots import figure, plot_title, readable_log_axes


def test_log_axes_label_the_measured_values_plainly(tmp_path):
    from matplotlib.ticker import NullFormatter

    with figure(tmp_path / "p.png", title=plot_title("m", "float32")) as (_, ax):
        ax.plot([512, 2048, 8160], [10, 20, 30])
        ax.set(xscale="log", yscale="log")
        readable_log_axes(ax, xticks=[512, 2048, 8160])
        assert isinstance(ax.xaxis.get_minor_formatter(), NullFormatter)
        assert isinstance(ax.yaxis.get_minor_formatter(), NullFormatter)
        assert list(ax.get_xticks()) == [512, 2048, 8160]
        assert [ax.xaxis.get_major_formatter()(v, 0) for v in ax.get_xticks()] == ["512", "2048", "8160"]
    assert (tmp_path / "p.png").stat().st_size > 0
