"""A MoE flash model in the app: it loads, chats from flash (expert cache) and the performance
panel receives one Stats per token with the expert hit rate and the bytes read."""

from __future__ import annotations

from PySide6.QtCore import Qt

from mlx_flash.moe.format import convert_to_moe_flash
from mlx_flash_app.history import COMPLETE
from tests.tiny_moe import make_tiny_moe

from .conftest import WAIT, set_sampling


def test_moe_flash_model_chats_with_expert_stats(make_window, qtbot, tmp_path):
    src = make_tiny_moe(tmp_path / "src", "qwen2_moe")
    fl = convert_to_moe_flash(src, tmp_path / "Tiny-MoE.flash")
    w = make_window(fl)
    assert w.engine.mode == "flash-router"
    assert w.engine.policy_info.experts_per_layer < w.engine.policy_info.num_experts
    set_sampling(w, max_tokens=12)
    with qtbot.waitSignal(w.answer_finished, timeout=WAIT) as blocker:
        w.prompt.setPlainText("Hello there")
        qtbot.keyClick(w.prompt, Qt.Key_Return)
    result = blocker.args[0]
    assert result["status"] == COMPLETE
    assert w.stats_panel.count == result["meta"]["tokens"] > 0
    assert "%" in w.stats_panel.card_hit.value.text()
    assert w.stats_panel._summary_titles["active"].text() == "active experts"
    assert 0.0 <= result["meta"]["hit_rate"] <= 1.0
