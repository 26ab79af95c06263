"""Token lengths of the training rows as a bar chart, with the max_length cut-off drawn as a red line."""

from __future__ import annotations

from textual_plotext import PlotextPlot


class TokenHistogram(PlotextPlot):
    def show(self, bins: list[tuple[float, float, int]], max_length: int | None) -> None:
        """`bins` are (low, high, count) token-length ranges."""
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title("tokens per example")
        if bins:
            centers = [(lo + hi) / 2 for lo, hi, _ in bins]
            counts = [c for _, _, c in bins]
            width = min(hi - lo for lo, hi, _ in bins) if len(bins) > 1 else 1
            over = [c if (lo + hi) / 2 > (max_length or float("inf")) else 0 for lo, hi, c in bins]
            plt.bar(centers, counts, width=0.9 if width else 1, color="cyan", label="rows")
            if any(over):
                plt.bar(centers, over, width=0.9, color="red", label="truncated")
            if max_length:
                plt.vline(max_length, color="red")
                hi = max(max_length * 1.05, bins[-1][1])
                plt.xlim(0, hi)
        plt.xlabel(f"tokens (red line: max_length {max_length})" if max_length else "tokens")
        self.refresh()
