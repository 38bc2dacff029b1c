"""The tools a pool may load: the ensembles of a Triton model repository.

A Triton model is ``NAME/config.pbtxt`` plus numbered version folders; a tool is an
ensemble, i.e. a model whose config says ``platform: "ensemble"``
(https://docs.nvidia.com/deeplearning/triton-inference-server/user-guide/docs/user_guide/architecture.html#ensemble-models).
The check is textual (one regular expression on the protobuf text format) so that the
operator's image does not need tritonclient's protobuf classes.
"""
from __future__ import annotations

import re
import threading
import time
from pathlib import Path

# `platform: "ensemble"` as a top-level field of ModelConfig in protobuf text format.
_ENSEMBLE = re.compile(r'^\s*platform\s*:\s*"ensemble"\s*(#.*)?$', re.MULTILINE)


def list_ensembles(repository: str | Path) -> set[str]:
    """Names of the ensemble models (folder names) in a model repository.

    Raises FileNotFoundError when the repository folder does not exist, so that a
    misconfigured path is not mistaken for "no tools".
    """
    root = Path(repository)
    if not root.is_dir():
        raise FileNotFoundError(f"model repository {str(root)!r} is not a folder")
    names: set[str] = set()
    for config in root.glob("*/config.pbtxt"):
        try:
            text = config.read_text(encoding="utf-8")
        except OSError:
            continue
        if _ENSEMBLE.search(text):
            names.add(config.parent.name)
    return names


class ToolCatalog:
    """``list_ensembles`` with a time-to-live cache (tools are added rarely)."""

    def __init__(self, repository: str | Path, ttl_seconds: float, clock=time.monotonic) -> None:
        self.repository = Path(repository)
        self.ttl = ttl_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._names: set[str] | None = None
        self._error: str | None = None
        self._read_at = float("-inf")

    def tools(self) -> tuple[set[str] | None, str | None]:
        """(the ensemble names, None) or (None, why the repository could not be read)."""
        with self._lock:
            if self._clock() - self._read_at >= self.ttl:
                try:
                    self._names, self._error = list_ensembles(self.repository), None
                except OSError as exc:
                    self._names, self._error = None, str(exc)
                self._read_at = self._clock()
            return (set(self._names) if self._names is not None else None), self._error
