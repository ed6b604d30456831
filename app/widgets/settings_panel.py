"""Chat settings: system prompt and sampling (temperature, top-p, max tokens), persisted."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

DEFAULTS = {"system_prompt": "", "temperature": 0.3, "top_p": 0.9, "max_tokens": 512}


class _SliderSpin(QWidget):
    """A slider with a spin box showing the same value (floats in ``[lo, hi]``)."""

    def __init__(self, lo: float, hi: float, step: float, decimals: int = 2, parent=None):
        super().__init__(parent)
        self._scale = 10 ** decimals
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.slider = QSlider(Qt.Horizontal)
        self.slider.setRange(int(lo * self._scale), int(hi * self._scale))
        self.spin = QDoubleSpinBox()
        self.spin.setRange(lo, hi)
        self.spin.setSingleStep(step)
        self.spin.setDecimals(decimals)
        self.spin.setFixedWidth(72)
        lay.addWidget(self.slider, 1)
        lay.addWidget(self.spin)
        self.slider.valueChanged.connect(lambda v: self.spin.setValue(v / self._scale))
        self.spin.valueChanged.connect(lambda v: self.slider.setValue(round(v * self._scale)))

    def value(self) -> float:
        return float(self.spin.value())

    def setValue(self, v: float) -> None:
        self.spin.setValue(v)


class ChatSettingsPanel(QScrollArea):
    changed = Signal()

    def __init__(self, settings=None, parent=None):
        super().__init__(parent)
        self.setWidgetResizable(True)
        self._settings = settings
        body = QWidget()
        body.setObjectName("RightPanel")
        lay = QVBoxLayout(body)
        lay.setContentsMargins(14, 12, 14, 12)
        lay.setSpacing(10)

        t = QLabel("SYSTEM PROMPT")
        t.setObjectName("SectionTitle")
        lay.addWidget(t)
        self.system_prompt = QPlainTextEdit()
        self.system_prompt.setPlaceholderText("Optional. Empty: the model's own default.")
        self.system_prompt.setFixedHeight(110)
        lay.addWidget(self.system_prompt)

        t = QLabel("SAMPLING")
        t.setObjectName("SectionTitle")
        lay.addWidget(t)
        form = QFormLayout()
        form.setLabelAlignment(Qt.AlignLeft)
        form.setHorizontalSpacing(10)
        form.setVerticalSpacing(10)
        self.temperature = _SliderSpin(0.0, 2.0, 0.05)
        self.temperature.setToolTip("0 = always the most likely token (deterministic)")
        form.addRow("Temperature", self.temperature)
        self.top_p = _SliderSpin(0.05, 1.0, 0.05)
        self.top_p.setToolTip("Sample only from the smallest set of tokens whose probability adds up to top-p")
        form.addRow("Top-p", self.top_p)
        self.max_tokens = QSpinBox()
        self.max_tokens.setRange(1, 32768)
        self.max_tokens.setSingleStep(64)
        form.addRow("Max tokens", self.max_tokens)
        lay.addLayout(form)
        reset = QPushButton("Reset to defaults")
        reset.setProperty("kind", "ghost")
        reset.clicked.connect(lambda: self.set_values(DEFAULTS))
        lay.addWidget(reset, 0, Qt.AlignLeft)
        lay.addStretch(1)
        self.setWidget(body)

        self.set_values(self._load())
        for sig in (self.system_prompt.textChanged, self.temperature.spin.valueChanged,
                    self.top_p.spin.valueChanged, self.max_tokens.valueChanged):
            sig.connect(self._save)

    def values(self) -> dict:
        return {
            "system_prompt": self.system_prompt.toPlainText().strip(),
            "temperature": self.temperature.value(),
            "top_p": self.top_p.value(),
            "max_tokens": int(self.max_tokens.value()),
        }

    def set_values(self, v: dict) -> None:
        v = {**DEFAULTS, **(v or {})}
        self.system_prompt.setPlainText(v["system_prompt"] or "")
        self.temperature.setValue(float(v["temperature"]))
        self.top_p.setValue(float(v["top_p"]))
        self.max_tokens.setValue(int(v["max_tokens"]))

    def _load(self) -> dict:
        s = self._settings
        if s is None:
            return dict(DEFAULTS)
        out = {}
        for k, d in DEFAULTS.items():
            val = s.value(f"chat/{k}", d)
            try:
                out[k] = type(d)(val) if val is not None else d
            except (TypeError, ValueError):
                out[k] = d
        return out

    def _save(self, *_) -> None:
        if self._settings is not None:
            for k, v in self.values().items():
                self._settings.setValue(f"chat/{k}", v)
        self.changed.emit()
