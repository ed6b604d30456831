"""The window's first-run job (a part of MainWindow): which model to open at start, and preparing the
embedded default model in a worker process (progress, time left and Cancel in the banner)."""

from __future__ import annotations

import time
from pathlib import Path

from mlx_flash import default_model, library, paths
from mlx_flash.units import eta_text

from . import workers


class FirstRunPart:
    """Start-up model choice and the first-run preparation; mixed into MainWindow."""

    def start(self) -> None:
        """Load the model: ``model_path``, else the last one used, else the embedded default
        (prepared on first run with progress in the window)."""
        if self.model_path is not None:
            self.load_model(Path(self.model_path))
            return
        last = self.settings.value("last_model")
        if last and Path(str(last)).is_dir() and library.describe(Path(str(last))) is not None:
            self.load_model(Path(str(last)))
            return
        ready = default_model.prepared_flash() if self.flash else default_model.prepared_mlx()
        if ready is not None:  # prepared before: no worker process needed
            self.load_model(ready)
            return
        self.prepare_default()

    def prepare_default(self, job=None) -> None:
        """First run: prepare the built-in model (GGUF → mlx → flash → predictors) in a worker
        process, with progress, the time left (from the rate measured so far) and Cancel in the
        banner; then load it. ``job``: ``(fn, kwargs)`` to run instead of the default model's
        preparation (``fn(progress=..., **kwargs)`` returns the folder to load; tests use a tiny model)."""
        if self._preparer is not None and self._preparer.running:
            return
        if job is None:
            job = (default_model.ensure_default_flash if self.flash else default_model.ensure_default_mlx, {})
        self._prepare_job = job
        self.notice.hide()
        self.banner.start("Preparing the built-in model (first run only)…", cancellable=True)
        self.banner.message.setText("starting the preparation process…")
        self.chat.empty.set_model(default_model.DEFAULT_MODEL_NAME, "converting the embedded model into the flash "
                                  "format and training its activation predictors: progress and time left above")
        self.statusBar().showMessage("Preparing the built-in model…")
        self._set_ready(False)
        self._prepare_t0 = time.monotonic()
        fn, kwargs = job
        w = workers.ProcessWorker(fn, kwargs, clean=paths.models_dir(), parent=self)
        w.progress.connect(self._on_prepare_progress)
        w.finished.connect(self._on_prepared)
        w.errored.connect(self._on_prepare_error)
        self._preparer = w.start()

    def cancel_prepare(self) -> None:
        """Stop the first-run preparation: its process is killed and its temporaries removed;
        finished steps (the mlx folder, an uncalibrated flash folder) are kept for next time."""
        w = self._preparer
        if w is None or not w.running:
            return
        w.cancel()

    def _on_prepare_progress(self, fraction: float, message: str) -> None:
        eta = eta_text(fraction, time.monotonic() - self._prepare_t0)  # measured, not a constant
        self.banner.set_progress(fraction, f"{message} · {eta}" if eta else message)
        self.statusBar().showMessage(f"Preparing the built-in model: {message}")

    def _on_prepare_error(self, message: str) -> None:
        self._preparer = None
        if self._closing:
            return
        self.banner.show_cancelled("Preparing the built-in model failed", message)
        self.notice.show_message("error", f"Could not prepare the built-in model: {message}")
        self.chat.empty.set_model("", "No model yet: prepare the built-in one above, or import one on the "
                                      "Models page.")
        self.statusBar().showMessage("No model loaded")
        self._set_ready(False)

    def _on_prepared(self, path) -> None:
        self._preparer = None
        if self._closing:
            return
        if path is None:  # cancelled
            self.banner.show_cancelled("Preparing the built-in model was cancelled",
                                       "Steps already finished are kept; preparing again continues from there.")
            self.chat.empty.set_model("", "No model yet: prepare the built-in one above, or import one on the "
                                          "Models page.")
            self.statusBar().showMessage("Preparation cancelled", 5000)
            return
        self.library.refresh()
        self._refresh_model_combo()
        self.model_prepared.emit(str(path))
        if self.engine is None and self._loader is None:  # unless another model was opened meanwhile
            self.load_model(Path(path))
        else:
            self.banner.hide()
