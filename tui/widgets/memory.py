"""The memory estimate of a run (from `ft-desk plan --json`): peak total, the verdict against this device, the
largest components as bars, and the changes that would make it fit."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from textual.widgets import Static

from ft_desk.trainer.events import format_bytes

VERDICT_STYLE = {"fits": "bold green", "tight": "bold yellow", "does not fit": "bold red", "no_fit": "bold red",
                 "does_not_fit": "bold red"}
BAR = 16


def components(plan: dict[str, Any]) -> list[tuple[str, int]]:
    """(name, bytes) of the plan's breakdown, largest first, whatever shape the planner used."""
    raw = plan.get("components") or plan.get("breakdown") or []
    out: list[tuple[str, int]] = []
    if isinstance(raw, dict):
        out = [(str(k), int(v)) for k, v in raw.items() if isinstance(v, (int, float))]
    else:
        for item in raw:
            if isinstance(item, dict):
                value = item.get("bytes", item.get("total_bytes"))
                if isinstance(value, (int, float)):
                    out.append((str(item.get("name") or item.get("label") or "?"), int(value)))
    return sorted(out, key=lambda kv: -kv[1])


def suggestions(plan: dict[str, Any]) -> list[str]:
    """The planner's changes as `what → new peak`, those that make the run fit first."""
    out = []
    items = sorted(plan.get("suggestions") or [], key=lambda i: not (isinstance(i, dict) and i.get("fits")))
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            text = item.get("change") or item.get("description") or item.get("text") or ""
            total = item.get("total_bytes", item.get("bytes"))
            overrides = item.get("overrides") or item.get("set")
            if not text and overrides:
                text = " ".join(f"{k}={v}" for k, v in overrides.items()) if isinstance(overrides, dict) else str(
                    overrides)
            mark = " ✓" if item.get("fits") else ""
            out.append(f"{text} → {format_bytes(total)}{mark}" if isinstance(total, (int, float)) else str(text))
    return [s for s in out if s]


def verdict_line(plan: dict[str, Any]) -> str:
    total = plan.get("total_bytes") or plan.get("peak_bytes")
    verdict = str(plan.get("verdict") or "").replace("_", " ")
    available = plan.get("device_budget_bytes") or plan.get("available_bytes")
    device = plan.get("device")
    device_name = device.get("name") or device.get("type") if isinstance(device, dict) else device
    style = VERDICT_STYLE.get(verdict, "bold")
    parts = [f"peak ≈ [b]{format_bytes(total)}[/b]" if isinstance(total, (int, float)) else "peak unknown"]
    if verdict:
        where = f" of {format_bytes(available)}" if isinstance(available, (int, float)) else ""
        on = f" on {escape(str(device_name))}" if device_name else ""
        parts.append(f"[{style}]{verdict}[/]{where}{on}")
    if plan.get("conservative") or plan.get("approximate") or plan.get("known_architecture") is False:
        parts.append("[dim](conservative: unknown architecture)[/]")
    return "  ".join(parts)


class MemoryPanel(Static):
    def on_mount(self) -> None:
        self.border_title = "memory estimate"
        self.update("[dim]The estimate appears once the recipe is valid.[/]")

    def loading(self) -> None:
        self.set_class(True, "-stale")

    def failed(self, message: str) -> None:
        self.set_class(False, "-stale")
        self.update(f"[yellow]No estimate:[/] {escape(message)}")

    def show(self, plan: dict[str, Any]) -> None:
        self.set_class(False, "-stale")
        lines = [verdict_line(plan)]
        parts = components(plan)[:4]
        if parts:
            biggest = parts[0][1] or 1
            room = (self.content_region.width or 80) - BAR - 12
            width = max(8, min(room, max(len(n) for n, _ in parts)))
            for name, value in parts:
                fill = max(1, round(BAR * value / biggest)) if value else 0
                label = name if len(name) <= width else name[: width - 1] + "…"
                lines.append(f"{escape(label):<{width}} [cyan]{'█' * fill}[/]{' ' * (BAR - fill)} "
                             f"{format_bytes(value)}")
        tips = suggestions(plan)
        if tips and str(plan.get("verdict", "")).replace("_", " ") != "fits":
            lines.append("[b]to make it fit:[/]")
            lines += [f"  • {escape(t)}" for t in tips[:2]]
        self.update("\n".join(lines))
