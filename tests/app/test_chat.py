"""The chat: streamed answers from a tiny real model, Stop, regenerate, history, export."""

from __future__ import annotations

import time

from PySide6.QtCore import Qt
from PySide6.QtGui import QKeySequence, QTextCursor

from mlx_flash_app.history import COMPLETE, INTERRUPTED, STOPPED, STREAMING, History
from mlx_flash_app.main_window import MainWindow

from .conftest import WAIT, set_sampling


def _send(qtbot, w, text="Hello there"):
    w.prompt.setPlainText(text)
    qtbot.keyClick(w.prompt, Qt.Key_Return)


def test_send_streams_an_answer(make_window, qtbot):
    w = make_window()
    set_sampling(w, max_tokens=24)
    with qtbot.waitSignal(w.answer_finished, timeout=WAIT) as blocker:
        _send(qtbot, w, "Hello there")
        assert w.generating
        assert w.stop_btn.isVisible() and not w.send_btn.isVisible()
    result = blocker.args[0]
    assert result["status"] == COMPLETE
    tokens = result["meta"]["tokens"]
    assert 1 < tokens <= 24
    # streamed: one Stats record per token reached the panel
    assert w.stats_panel.count == tokens
    msgs = w.chat.messages
    assert [m.role for m in msgs] == ["user", "assistant"]
    assert msgs[0].text() == "Hello there"
    assert msgs[1].text() == result["text"]
    assert "tok/s" in msgs[1].footer.text() and "tokens" in msgs[1].footer.text()
    # stored
    (conv,) = w.history.conversations()
    assert conv.title == "Hello there"
    stored = w.history.messages(conv.id)
    assert [(m.role, m.status) for m in stored] == [("user", COMPLETE), ("assistant", COMPLETE)]
    assert stored[1].content == result["text"] and stored[1].meta["tokens"] == tokens
    assert w.send_btn.isEnabled() and not w.prompt.isReadOnly()
    assert w.prompt.toPlainText() == ""


def test_shift_enter_inserts_a_new_line(make_window, qtbot):
    w = make_window()
    w.prompt.setPlainText("line one")
    w.prompt.moveCursor(QTextCursor.End)
    qtbot.keyClick(w.prompt, Qt.Key_Return, Qt.ShiftModifier)
    qtbot.keyClicks(w.prompt, "line two")
    assert not w.generating
    assert w.prompt.toPlainText() == "line one\nline two"
    assert w.chat.messages == []


def test_stop_mid_answer_saves_partial_text(make_window, qtbot, chatty_flash):
    w = make_window(chatty_flash)
    set_sampling(w, max_tokens=5000)
    _send(qtbot, w, "Tell me a very long story")
    g = w._gen
    # partial text reaches the database while streaming
    qtbot.waitUntil(lambda: (w.history.message(g.msg_id).content != ""), timeout=WAIT)
    assert w.history.message(g.msg_id).status == STREAMING
    assert w.chat.messages[-1].status == STREAMING
    with qtbot.waitSignal(w.answer_finished, timeout=WAIT) as blocker:
        t0 = time.perf_counter()
        qtbot.mouseClick(w.stop_btn, Qt.LeftButton)
    stop_s = time.perf_counter() - t0
    result = blocker.args[0]
    assert result["status"] == STOPPED
    assert 0 < result["meta"]["tokens"] < 5000
    assert stop_s < 10, f"stopping took {stop_s:.1f} s"
    msg = w.history.message(result["msg_id"])
    assert msg.status == STOPPED and msg.content == result["text"]
    assert w.chat.messages[-1].status == STOPPED
    assert w.chat.messages[-1].badge.text() == "stopped"
    assert not w.generating and w.send_btn.isEnabled()


def test_escape_stops(make_window, qtbot, chatty_flash):
    w = make_window(chatty_flash)
    set_sampling(w, max_tokens=5000)
    _send(qtbot, w)
    qtbot.waitUntil(lambda: w.stats_panel.count >= 2, timeout=WAIT)
    with qtbot.waitSignal(w.answer_finished, timeout=WAIT) as blocker:
        w.act_stop.trigger()
    assert blocker.args[0]["status"] == STOPPED


def test_history_survives_reopening(make_window, qtbot, data_home):
    w1 = make_window()
    set_sampling(w1, max_tokens=12)
    with qtbot.waitSignal(w1.answer_finished, timeout=WAIT) as blocker:
        _send(qtbot, w1, "Remember me")
    answer = blocker.args[0]["text"]
    w1.close()

    w2 = make_window()
    assert w2.chat_settings.values()["max_tokens"] == 12  # settings persisted too
    assert w2.conversations.list.count() == 1
    assert w2.conversations.list.item(0).text() == "Remember me"
    w2.conversations.list.setCurrentRow(0)  # the user clicks it
    msgs = w2.chat.messages
    assert [(m.role, m.text()) for m in msgs] == [("user", "Remember me"), ("assistant", answer)]
    assert "tok/s" in msgs[1].footer.text()


def test_interrupted_answer_is_shown_after_a_crash(make_window, qtbot, data_home):
    # what a killed app leaves behind: an answer still marked streaming
    with History(data_home / "history.sqlite3") as h:
        c = h.new_conversation("Crashed")
        h.add_message(c, "user", "hi")
        h.add_message(c, "assistant", "Half of an", status=STREAMING)
    w = make_window()
    assert w.recovered == 1
    assert "interrupted" in w.notice.text()
    w.open_conversation(c)
    last = w.chat.messages[-1]
    assert last.text() == "Half of an" and last.status == INTERRUPTED
    qtbot.waitUntil(last.badge.isVisible)  # new widgets show on the next event-loop turn
    assert last.badge.text() == "interrupted"


def test_regenerate_new_chat_and_export(make_window, qtbot, tmp_path):
    w = make_window()
    set_sampling(w, max_tokens=8, temperature=0.9)
    with qtbot.waitSignal(w.answer_finished, timeout=WAIT):
        _send(qtbot, w, "Say something")
    conv = w.conv_id
    with qtbot.waitSignal(w.answer_finished, timeout=WAIT) as blocker:
        qtbot.mouseClick(w.chat.messages[-1].regen_btn, Qt.LeftButton)
    assert blocker.args[0]["status"] == COMPLETE
    stored = w.history.messages(conv)
    assert [m.role for m in stored] == ["user", "assistant"]
    assert stored[1].content == blocker.args[0]["text"]
    assert len(w.chat.messages) == 2

    out = w.export_conversation(conv, tmp_path / "chat.md")
    md = out.read_text()
    assert md.startswith("# Say something") and "## You\n\nSay something" in md

    w.act_new.trigger()  # Ctrl/Cmd+N
    assert w.conv_id is None and w.chat.messages == [] and w.chat.empty.isVisibleTo(w)
    with qtbot.waitSignal(w.answer_finished, timeout=WAIT):
        _send(qtbot, w, "Second chat")
    assert w.conv_id != conv
    assert w.conversations.list.count() == 2
    w.open_conversation(conv)
    assert w.chat.messages[0].text() == "Say something"


def test_new_chat_shortcut_is_the_platform_new_key(make_window):
    w = make_window(load=False)
    assert w.act_new.shortcut() == QKeySequence(QKeySequence.New)


def test_window_geometry_and_panels_restored(make_window, qtbot):
    w1 = make_window(load=False)
    w1.nav_panel.click()  # hide the performance panel
    assert not w1.right.isVisible()
    w1.resize(720, 520)  # the offscreen screen is 800 wide: restoring clamps to it
    qtbot.waitUntil(lambda: (w1.width(), w1.height()) == (720, 520))
    w1.right.setCurrentIndex(1)
    w1.close()

    w2 = MainWindow(model_path=None)
    qtbot.addWidget(w2)
    w2.show()
    assert (w2.width(), w2.height()) == (720, 520)
    assert not w2.right.isVisible() and not w2.nav_panel.isChecked()
    assert w2.right.currentIndex() == 1
    w2.close()
