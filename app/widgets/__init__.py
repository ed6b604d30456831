"""The app's widgets: chat view, prompt box, conversation list, chat settings, stats panel,
model library and speed-test dialog."""
