"""Token lengths of the training rows as horizontal bars, one per length range; the last range is the rows longer
than max_length, which training cuts (drawn red when there are any).

The ranges are merged pairwise until each bar has a row of its own, so every bar keeps its label whatever the
widget's height (plotext would otherwise drop labels, and which ones depends on the order of resizes)."""

from __future__ import annotations

from textual.app import RenderResult
from textual_plotext import PlotextPlot

from ft_desk.tui.widgets.loss_chart import step_ticks


def merge_to_fit(buckets: list[dict], rows: int) -> list[dict]:
    """Adjacent ranges merged until at most `rows` remain; the open range above max_length stays apart."""
    closed = [dict(b) for b in buckets if b.get("hi") is not None]
    over = [dict(b) for b in buckets if b.get("hi") is None]
    rows = max(1, rows - len(over))
    while len(closed) > rows:
        closed = [
            {"lo": pair[0]["lo"], "hi": pair[-1]["hi"], "count": sum(int(b.get("count") or 0) for b in pair)}
            for pair in (closed[i:i + 2] for i in range(0, len(closed), 2))
        ]
    return closed + over


def bucket_labels(buckets: list[dict]) -> list[str]:
    """`1-32`, `33-64`, ... and `>256 cut` for the open range above max_length."""
    out = []
    for b in buckets:
        hi = b.get("hi")
        out.append(f"{b.get('lo')}-{hi}" if hi is not None else f">{int(b.get('lo') or 1) - 1} cut")
    return out


class TokenHistogram(PlotextPlot):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.buckets: list[dict] = []
        self.max_length: int | None = None

    def show(self, buckets: list[dict], max_length: int | None) -> None:
        """`buckets` as `ft-desk data check --json` reports them: {"lo", "hi" (None: above max_length), "count"}."""
        self.buckets, self.max_length = list(buckets), max_length
        self.refresh()

    def render(self) -> RenderResult:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(f"tokens per row (max_length {self.max_length})" if self.max_length else "tokens per row")
        if self.buckets:
            shown = merge_to_fit(self.buckets, self.size.height - 4)
            # plotext draws the first bar at the bottom: reverse so the shortest range is on top, like a table.
            labels = bucket_labels(shown)[::-1]
            counts = [int(b.get("count") or 0) for b in shown][::-1]
            over = [c if label.endswith("cut") else 0 for label, c in zip(labels, counts)]
            within = [0 if label.endswith("cut") else c for label, c in zip(labels, counts)]
            plt.bar(labels, within, orientation="horizontal", color="cyan", width=0.6)
            if any(over):
                plt.bar(labels, over, orientation="horizontal", color="red", width=0.6)
            if max(counts, default=0) > 0:  # whole rows on the count axis: a narrow chart said 19.5 and 58.5
                ticks = [t for t in step_ticks(max(counts), 3 if self.size.width < 40 else 4) if t <= max(counts)]
                plt.xticks(ticks, [str(t) for t in ticks])
        return super().render()
