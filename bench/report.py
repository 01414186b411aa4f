"""Figures, their same-run baselines and the targets, printed as plain-text tables on stdout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# x: a ratio to a floor; M instr: millions of instructions
Unit = Literal["ms", "rows/s", "msg/s", "MB", "s", "x", "M instr"]


@dataclass(frozen=True)
class Baseline:
    name: str
    value: float


@dataclass(frozen=True)
class Figure:
    """One measurement. Its ratio to each baseline is value / baseline (both in the figure's unit)."""

    name: str
    value: float
    unit: Unit
    detail: str = ""
    baselines: tuple[Baseline, ...] = ()


@dataclass(frozen=True)
class Target:
    name: str
    limit: float
    unit: Unit
    higher_is_better: bool
    measured: float | None = None  # None: not measured (the reason is in note)
    note: str = ""

    @property
    def status(self) -> str:
        if self.measured is None:
            return "n/a"
        met = self.measured >= self.limit if self.higher_is_better else self.measured <= self.limit
        return "PASS" if met else "MISS"

    def describe(self) -> str:
        sign = ">=" if self.higher_is_better else "<="
        got = "not measured" if self.measured is None else fmt(self.measured, self.unit)
        note = f"  ({self.note})" if self.note else ""
        return f"{self.status:<4}  {self.name:<40} {sign} {fmt(self.limit, self.unit):<16} got {got}{note}"


@dataclass
class Report:
    """Prints each section as soon as it is measured (runs are long) and keeps the targets for the summary."""

    targets: list[Target] = field(default_factory=list)

    def section(self, title: str) -> None:
        print(f"\n== {title}", flush=True)

    def note(self, text: str) -> None:
        print(f"   {text}", flush=True)

    def table(self, figures: list[Figure]) -> None:
        if not figures:
            return
        rows: list[tuple[str, ...]] = [("figure", "value", "detail", "baseline (same run)", "baseline", "ratio")]
        for fig in figures:
            value = fmt(fig.value, fig.unit)
            if not fig.baselines:
                rows.append((fig.name, value, fig.detail, "", "", ""))
            for i, base in enumerate(fig.baselines):
                ratio = f"{fig.value / base.value:.2f}x" if base.value else "-"
                head = (fig.name, value, fig.detail) if i == 0 else ("", "", "")
                rows.append((*head, base.name, fmt(base.value, fig.unit), ratio))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        right = {1, 4, 5}  # numbers line up on the right
        for row in rows:
            cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
            print("   " + "  ".join(cells).rstrip(), flush=True)

    def target(self, target: Target) -> None:
        self.targets.append(target)
        print(f"   target: {target.describe()}", flush=True)

    def summary(self) -> None:
        self.section("summary (targets are reported, never enforced)")
        if not self.targets:
            self.note("no targets measured")
        for target in self.targets:
            self.note(target.describe())


def fmt(value: float, unit: Unit) -> str:
    if unit in ("rows/s", "msg/s"):
        return f"{value:,.0f} {unit}"
    if unit == "ms":
        return f"{value:.1f} ms"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "M instr":
        return f"{value:,.1f} M instr"
    return f"{value:.1f} MB"
