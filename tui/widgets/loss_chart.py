"""Train and validation loss over steps, drawn with plotext: raw train loss faint, smoothed train loss, val loss."""

from __future__ import annotations

from textual.app import RenderResult
from textual_plotext import PlotextPlot

from ft_desk.tui.history import RunHistory

MAX_POINTS = 400
COMPACT_HEIGHT = 14
COMPACT_WIDTH = 70
FRAME_ROWS = 5
"""Rows of a full chart that are not plot area: the title, the frame's top and bottom, the x ticks, the x label."""
"""Note: plotext redraws every point on each refresh; beyond a few hundred the chart is thinned to keep it cheap."""


def thin(xs: list[float], ys: list[float], limit: int = MAX_POINTS) -> tuple[list[float], list[float]]:
    if len(xs) <= limit:
        return xs, ys
    stride = -(-len(xs) // limit)
    keep = list(range(0, len(xs), stride))
    if keep[-1] != len(xs) - 1:
        keep.append(len(xs) - 1)
    return [xs[i] for i in keep], [ys[i] for i in keep]


def step_ticks(total: int, count: int = 5) -> list[int]:
    """Round step numbers for the x axis (0, 20, 40... rather than 20.2, 40.5)."""
    raw = total / max(1, count - 1)
    magnitude = 10 ** (len(str(int(raw))) - 1) if raw >= 1 else 1
    step = max(m * magnitude for m in (1, 2, 5) if m * magnitude <= max(raw, 1))
    return list(range(0, total + 1, max(1, step)))


class LossChart(PlotextPlot):
    """Drawn from the run's history at render time, so the picture depends only on the data and the final size."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.history = RunHistory()

    def show(self, history: RunHistory) -> None:
        self.history = history
        self.refresh()

    def render(self) -> RenderResult:
        history = self.history
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        # A small chart (an 80x24 terminal) spends no rows on a title, an axis label or a legend box, which
        # would cover most of it: the key is one short title line instead.
        compact = self.size.height < COMPACT_HEIGHT or self.size.width < COMPACT_WIDTH
        if compact:
            plt.title("loss: train · smoothed · val ●")
        else:
            plt.title("loss")
            plt.xlabel("step")
        steps = [float(p.step) for p in history.steps]
        if steps:
            smooth = history.smoothed_losses()
            xs, ys = thin(steps, [p.loss for p in history.steps])
            plt.plot(xs, ys, marker="braille", color="gray", label=None if compact else "train")
            xs, ys = thin(steps, smooth)
            plt.plot(xs, ys, marker="braille", color="cyan", label=None if compact else "train (smoothed)")
        if history.evals:
            plt.plot([float(p.step) for p in history.evals], [p.val_loss for p in history.evals],
                     marker="dot", color="orange", label=None if compact else "val")
            plt.scatter([float(p.step) for p in history.evals], [p.val_loss for p in history.evals],
                        marker="●", color="orange")
        if not compact:
            self._room_for_legend(history, legend_rows=3 if history.evals else 2)
        total = history.total_steps
        if total:
            plt.xlim(0, total)
            ticks = step_ticks(total)
            plt.xticks(ticks, [str(t) for t in ticks])
        return super().render()

    def _room_for_legend(self, history: RunHistory, legend_rows: int) -> None:
        """Raise the y axis so the legend (plotext draws it in the top-left corner) sits above the data: a loss
        curve starts high at step 0, right where the legend is, and the first steps were hidden under it."""
        values = [p.loss for p in history.steps] + [p.val_loss for p in history.evals]
        values = [v for v in values if v == v and abs(v) != float("inf")]  # NaN and inf have no place on an axis
        rows = self.size.height - FRAME_ROWS
        if not values or rows <= legend_rows + 2:
            return
        low, high = min(values), max(values)
        span = (high - low) or max(abs(high), 1.0) * 0.1
        self.plt.ylim(low, high + span * legend_rows / (rows - legend_rows))
