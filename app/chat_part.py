"""The window's chat job (a part of MainWindow): conversations (new, open, rename, delete, export) and the
answer being generated (send, regenerate, stream, stop, finish). The Qt-free state is in chat_state.py."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from PySide6.QtCore import QTimer
from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import QFileDialog, QMessageBox

from mlx_flash import library
from mlx_flash.atomic import atomic_write_text

from . import theme, workers
from .chat_state import Generation, export_file_name, history_messages
from .history import COMPLETE, ERROR, STOPPED, STREAMING, title_from
from .widgets.chat_view import MessageWidget

RENDER_MS = 60         # re-render the streaming answer at most this often
SAVE_MS = 500          # write the partial answer to the history this often


class ChatPart:
    """Conversations and answers; mixed into MainWindow, whose widgets (chat, composer, conversations,
    stats panel, notice, banner) and history it uses."""

    def _init_chat(self) -> None:
        self._render_timer = QTimer(self)
        self._render_timer.setInterval(RENDER_MS)
        self._render_timer.timeout.connect(self._render_stream)
        self._save_timer = QTimer(self)
        self._save_timer.setInterval(SAVE_MS)
        self._save_timer.timeout.connect(self._save_partial)

    # ============================================================ conversations
    def reload_conversations(self) -> None:
        self.conversations.set_conversations(self.history.conversations(), self.conv_id)

    def new_chat(self) -> None:
        if self._gen is not None:
            self.stop()
            self._detach_generation()
        self.conv_id = None
        self.chat.clear()
        self.conversations.select(None)
        self.show_page(0)
        self.export_btn.setEnabled(False)
        self.prompt.setFocus()

    def open_conversation(self, conv_id: int) -> None:
        if conv_id == self.conv_id:
            return
        if self._gen is not None:
            self.stop()
            self._detach_generation()
        conv = self.history.conversation(conv_id)
        if conv is None:
            return
        self.conv_id = conv_id
        self.banner.release()
        self.chat.clear()
        for m in self.history.messages(conv_id):
            self.chat.add_message(m.role, m.content, name=self._role_name(m.role, m.meta.get("model")),
                                  status=m.status, meta=m.meta, msg_id=m.id)
        self.conversations.select(conv_id)
        self.export_btn.setEnabled(True)

    def rename_conversation(self, conv_id: int, title: str) -> None:
        self.history.rename_conversation(conv_id, title)
        self.reload_conversations()

    def _confirm_delete(self, conv_id: int) -> None:
        conv = self.history.conversation(conv_id)
        if conv is None:
            return
        r = QMessageBox.question(self, "Delete chat", f"Delete “{conv.title}”? This cannot be undone.",
                                 QMessageBox.Yes | QMessageBox.Cancel, QMessageBox.Cancel)
        if r == QMessageBox.Yes:
            self.delete_conversation(conv_id)

    def delete_conversation(self, conv_id: int) -> None:
        if self._gen is not None and self._gen.conv_id == conv_id:
            self.stop()
            self._detach_generation()
        self.history.delete_conversation(conv_id)
        if self.conv_id == conv_id:
            self.conv_id = None
            self.chat.clear()
        self.reload_conversations()

    def export_conversation(self, conv_id: int, path: Path) -> Path:
        return atomic_write_text(path, self.history.export_markdown(conv_id))

    def _export_dialog(self, conv_id: Optional[int]) -> None:
        if conv_id is None:
            self.statusBar().showMessage("Nothing to export yet", 3000)
            return
        conv = self.history.conversation(conv_id)
        f, _ = QFileDialog.getSaveFileName(self, "Export chat as Markdown",
                                           str(Path.home() / export_file_name(conv.title)), "Markdown (*.md)")
        if f:
            self.export_conversation(conv_id, Path(f))
            self.statusBar().showMessage(f"Exported to {f}", 5000)

    def _role_name(self, role: str, model: Optional[str] = None) -> str:
        if role == "user":
            return "You"
        if model:
            return model
        return library.display_name(self.engine_path) if self.engine_path else "Assistant"

    # ==================================================================== chat
    @property
    def generating(self) -> bool:
        return self._gen is not None

    def _set_ready(self, ready: bool) -> None:
        """Input enabled when a model is loaded and nothing is generating."""
        idle = self._gen is None
        can_send = ready and idle and self.engine is not None
        self.send_btn.setEnabled(can_send)
        self.prompt.setReadOnly(not (self.engine is not None and idle))
        self.composer.set_generating(not idle)
        self.model_combo.setEnabled(idle and self._loader is None and self._preparer is None)
        if self.engine is None:
            self.composer.hint.setText("Waiting for the model…")
        elif not idle:
            self.composer.hint.setText("Generating… Esc or the ■ button stops.")
        else:
            new = QKeySequence(QKeySequence.New).toString(QKeySequence.NativeText)
            self.composer.hint.setText(f"{library.display_name(self.engine_path)} · Enter to send · "
                                       f"Shift+Enter new line · {new} new chat")

    def send(self, text: str) -> bool:
        """Send ``text`` as the user's message and stream the answer. False when not possible now."""
        text = (text or "").strip()
        if not text or self.engine is None or self._gen is not None:
            return False
        vals = self.chat_settings.values()
        name = library.display_name(self.engine_path)
        if self.conv_id is None:
            self.conv_id = self.history.new_conversation(
                title_from(text), model=name, system_prompt=vals["system_prompt"] or None,
                settings={k: vals[k] for k in ("temperature", "top_p", "max_tokens")})
            self.reload_conversations()
            self.export_btn.setEnabled(True)
        mid = self.history.add_message(self.conv_id, "user", text)
        self.banner.release()
        self.chat.add_message("user", text, name="You", msg_id=mid)
        self.prompt.clear()
        self._start_generation()
        return True

    def regenerate(self, widget: Optional[MessageWidget] = None) -> bool:
        """Answer the last user message again (replacing the last answer)."""
        if self._gen is not None or self.engine is None or self.conv_id is None:
            return False
        widget = widget or self.chat.last_assistant()
        msgs = self.chat.messages
        if widget is None or not msgs or msgs[-1] is not widget or widget.role != "assistant":
            return False
        if widget.msg_id is not None:
            self.history.delete_messages_from(self.conv_id, widget.msg_id)
        self.chat.remove_message(widget)
        self._start_generation()
        return True

    def _start_generation(self) -> None:
        conv_id = self.conv_id
        messages = history_messages(self.history, conv_id)
        vals = self.chat_settings.values()
        name = library.display_name(self.engine_path)
        mid = self.history.add_message(conv_id, "assistant", "", status=STREAMING,
                                       meta={"model": name, "mode": self.engine.mode})
        widget = self.chat.add_message("assistant", "", name=name, status=STREAMING, msg_id=mid,
                                       meta={"model": name})
        engine = self.engine
        system = vals["system_prompt"] or None
        max_tokens, temperature, top_p = vals["max_tokens"], vals["temperature"], vals["top_p"]

        def job(w: workers.Worker):
            return engine.stream_generate(messages, max_tokens, temperature=temperature, top_p=top_p,
                                          system=system, should_stop=lambda: w.stop_requested)

        w = workers.Worker(job)
        gen = Generation(conv_id, mid, widget, w)
        self._gen = gen
        w.yielded.connect(self._on_token)
        w.finished.connect(self._on_generation_done)
        w.errored.connect(self._on_generation_error)
        self.stats_panel.begin()
        self._set_ready(True)
        self.statusBar().showMessage("Generating…")
        self._render_timer.start()
        self._save_timer.start()
        workers.start(w, self)

    def _on_token(self, r) -> None:
        g = self._gen
        if g is None or self.sender() is not g.worker:
            return
        if g.t_first is None:
            g.t_first = time.perf_counter()
            new = [n for n in r.stats.notes if self.engine is None or n not in self.engine.notes]
            if new:  # this prompt's own warnings (e.g. longer than the model's context)
                self.notice.show_message("warning", "Note: " + " · ".join(new))
        g.text += r.text
        g.stats = r.stats
        g.tokens += 1
        if r.finish_reason:
            g.finish_reason = r.finish_reason
        self.stats_panel.add_stats(r.stats)
        s = r.stats
        self.status_mem.setText(f"resident {theme.human_bytes(s.resident_bytes)} · "
                                f"RSS {theme.human_bytes(s.process_rss)}")

    def _render_stream(self) -> None:
        g = self._gen
        if g is None or g.widget is None:
            return
        if g.rendered_text != g.text:
            g.rendered_text = g.text
            g.widget.set_text(g.text)
            if g.stats is not None:
                g.widget.footer.setText(f"{g.stats.tokens_per_s:.1f} tok/s  ·  {g.tokens} tokens")

    def _save_partial(self) -> None:
        g = self._gen
        if g is not None and g.text != g.saved_text:
            self.history.update_message(g.msg_id, g.text)
            g.saved_text = g.text

    def _finish(self, status: str, error: Optional[str] = None) -> None:
        g = self._gen
        self._gen = None
        self._render_timer.stop()
        self._save_timer.stop()
        if g is None:
            return
        meta = g.meta(library.display_name(self.engine_path) if self.engine_path else None)
        if error:
            meta["error"] = error
        self.history.update_message(g.msg_id, g.text, status=status, meta=meta)
        self.history.update_conversation(g.conv_id)
        if g.widget is not None:
            g.widget.set_status(status)
            g.widget.set_text(g.text)
            g.widget.set_meta(meta)
        self.stats_panel.flush()
        self.reload_conversations()
        self._set_ready(self.engine is not None)
        if status == COMPLETE:
            self.statusBar().showMessage(f"{g.tokens} tokens · {meta.get('tokens_per_s', 0):.1f} tok/s", 8000)
        elif status == STOPPED:
            self.statusBar().showMessage("Stopped", 5000)
        self.answer_finished.emit({"conv_id": g.conv_id, "msg_id": g.msg_id, "status": status, "text": g.text,
                                   "meta": meta})
        if self._pending_load is not None and not self._closing:
            p, self._pending_load = self._pending_load, None
            self.load_model(p)

    def _on_generation_done(self, _result) -> None:
        g = self._gen
        if g is None or self.sender() is not g.worker:
            return
        stopped = g.stop_requested or g.finish_reason == "cancelled"
        self._finish(STOPPED if stopped else COMPLETE)

    def _on_generation_error(self, message: str) -> None:
        g = self._gen
        if g is None or self.sender() is not g.worker:
            return
        self.notice.show_message("error", f"Generation failed: {message}")
        self._finish(ERROR, error=message)

    def stop(self) -> None:
        """Stop the answer being generated (it ends within one token)."""
        g = self._gen
        if g is None:
            return
        g.stop_requested = True
        g.worker.request_stop()
        self.stop_btn.setEnabled(False)
        self.statusBar().showMessage("Stopping…")

    def _detach_generation(self) -> None:
        """The view is about to change: the running answer keeps saving to the history
        but no longer draws into a widget."""
        if self._gen is not None:
            self._gen.widget = None
