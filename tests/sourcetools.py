"""What the config-source tests share: a recorder of the source callbacks, and a wait."""

from __future__ import annotations

import asyncio
import time


class Recorder:
    """on_change/on_error of a source: (when, model) and every error list reported."""

    def __init__(self):
        self.models, self.errors = [], []

    def on_change(self, model):
        self.models.append((time.monotonic(), model))

    def on_error(self, errors):
        self.errors.append(errors)


async def until(pred, timeout=10.0, step=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(step)
    return False
