"""The window's speed-test job (a part of MainWindow): one SpeedTestDialog, opened on the current or
selected model, shut down with the window."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


class SpeedTestPart:
    """The speed test dialog; mixed into MainWindow."""

    def open_speed_test(self, path: Optional[Path] = None):
        # deferred: the speed test imports the engine (mlx-lm, transformers: seconds); the window opens first
        from .widgets.speed_test import SpeedTestDialog  # noqa: PLC0415

        path = Path(path) if path else (self.engine_path or self.library.selected_path())
        if self._speed_dialog is None:
            self._speed_dialog = SpeedTestDialog(self.settings, self, base_config=self.config)
        dlg = self._speed_dialog
        dlg.set_model(path)
        dlg.show()
        dlg.raise_()
        dlg.activateWindow()
        return dlg

    def _shutdown_speed_test(self) -> None:
        if self._speed_dialog is not None:
            self._speed_dialog.shutdown()
