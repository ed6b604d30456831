"""Checksum verification of ``ffn.bin`` while a model loads and starts to generate.

The engine reads single neurons (a few KB each) from ``ffn.bin``; checking each read
against a checksum would need per-neuron checksums the format does not have. Instead
:class:`BackgroundVerifier` hashes every layer region once (the manifest's blake2b per
layer, :class:`~mlx_flash.storage.format.LayerHasher`: large sequential reads that bypass
the page cache) in a background thread started when the model is opened, in layer order,
so it overlaps the rest of loading (dense weights, tokenizer, cache policy) and the
prompt. :meth:`BackgroundVerifier.check` is called by each layer's ``SparseFFN`` before
its output is used: it returns at once for a verified layer, waits for one being hashed,
and raises :class:`~mlx_flash.storage.format.ChecksumError` (naming the file and the
layer) once any layer failed, so no token is computed from corrupt weights.
Measured costs: docs/ARCHITECTURE.md ("Checksums").
"""

from __future__ import annotations

import threading
import time
from typing import List, Optional, Sequence

from .format import ChecksumError, FlashFiles, LayerHasher, verify_file


class BackgroundVerifier:
    """Verify every layer of an opened flash folder once, in a background thread;
    ``side_files`` (e.g. ``dense.safetensors``, checked against ``Manifest.checksums``)
    first: a failure there fails every layer's check. ``start=False``: nothing is hashed
    until :meth:`start`, which may name the layered file the engine chose to read.
    ``hashed`` lists the files verified whole so far (side files, then the layered file)."""

    def __init__(self, files: FlashFiles, *, direct: bool = True, start: bool = True,
                 side_files: Sequence[str] = ()):
        self.files = files
        self.direct = direct
        self.side_files = tuple(side_files)
        n = files.manifest.num_layers
        self._done = [threading.Event() for _ in range(n)]
        self._error: Optional[BaseException] = None
        self._stop = False
        self._all_ok = False
        self.layer_ms: List[float] = []  # hashing time of each verified layer
        self.seconds = 0.0               # wall time from start to the last layer
        self.hashed: List[str] = []      # names of the files verified whole, in order
        self._thread = threading.Thread(target=self._run, name="mlx-flash-verify", daemon=True)
        if start:
            self._thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            for name in self.side_files:
                verify_file(self.files, name)
                self.hashed.append(name)
            with LayerHasher(self.files, direct=self.direct) as hasher:
                for i, ev in enumerate(self._done):
                    if self._stop:
                        break
                    ta = time.perf_counter()
                    hasher.verify(i)
                    self.layer_ms.append((time.perf_counter() - ta) * 1e3)
                    if i == len(self._done) - 1:  # before the last event: wait() returns with it listed
                        self.hashed.append(self.files.ffn_path.name)
                    ev.set()
        except BaseException as e:  # ChecksumError, OSError: reported by check()
            self._error = e
        finally:
            self.seconds = time.perf_counter() - t0
            for ev in self._done:
                ev.set()

    def start(self, files: Optional[FlashFiles] = None) -> None:
        """Start hashing (a verifier made with ``start=False``); ``files``: the layered file to
        verify instead of the one given at construction (the engine's choice at load, e.g. the
        up/down side file ``storage.format.updown_files``; the same layers, its own checksums)."""
        if files is not None:
            if files.manifest.num_layers != len(self._done):
                raise ValueError(f"{files.ffn_path}: {files.manifest.num_layers} layers, "
                                 f"the verifier was made for {len(self._done)}")
            self.files = files
        self._thread.start()

    @property
    def finished(self) -> bool:
        return self._done[-1].is_set() if self._done else True

    def _raise(self) -> None:
        e = self._error
        if isinstance(e, ChecksumError):
            raise ChecksumError(str(e)) from None  # a fresh exception per caller (no shared traceback)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"{e.filename or self.files.ffn_path}: cannot be read to verify it: "
                                   f"{e.strerror or e}") from None
        raise ChecksumError(f"{self.files.ffn_path}: could not be verified ({e!r})") from None

    def check(self, layer: int) -> None:
        """Return when ``layer`` is verified; raise when any layer failed (or verification
        was stopped before ``layer``)."""
        if self._all_ok:
            return
        self._done[layer].wait()
        if self._error is not None:
            self._raise()
        if layer >= len(self.layer_ms):
            raise ChecksumError(f"{self.files.ffn_path}: layer {layer} was not verified (the engine is closed)")
        if len(self.layer_ms) == len(self._done):
            self._all_ok = True

    def wait(self) -> None:
        """Block until every layer is verified; raise like :meth:`check`."""
        for i in range(len(self._done)):
            self.check(i)

    def raise_if_failed(self) -> None:
        """Raise now if a layer already failed (no waiting)."""
        if self._error is not None:
            self._raise()

    def close(self) -> None:
        self._stop = True
        if self._thread.is_alive():
            self._thread.join()


__all__ = ["BackgroundVerifier"]
