"""Training progress for people: a bar over the images a training run steps through, fed by the trainers'
``on_step(name, images_seen, projector)`` observers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tqdm import tqdm

Observer = Callable[[str, int, Any], None]


class ImagesSeen:
    """An ``on_step`` observer that advances ``bar`` by the images trained on, averaged over the variants
    ``names``: variants trained in lockstep advance it together, variants trained one after another (the direct
    trainer) each fill their share. A variant's count never goes back: a retraining that starts over adds
    nothing until it passes what that variant already showed. Safe to share between training threads."""

    def __init__(self, bar: tqdm, names: tuple[str, ...] | list[str]) -> None:
        self.bar = bar
        self.seen = dict.fromkeys(names, 0)
        self.shown = 0

    def __call__(self, name: str, seen: int, _projector: Any) -> None:
        if seen <= self.seen.get(name, seen):
            return
        with self.bar.get_lock():
            self.seen[name] = seen
            total = sum(self.seen.values()) // len(self.seen)
            if total > self.shown:
                self.bar.update(total - self.shown)
                self.shown = total


def both(*observers: Observer | None) -> Observer:
    """One observer that calls each of ``observers`` (None ones skipped) in turn."""
    chosen = [o for o in observers if o is not None]

    def observe(name: str, seen: int, projector: Any) -> None:
        for observer in chosen:
            observer(name, seen, projector)

    return observe
