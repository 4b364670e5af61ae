"""The CLIP text tokenizer (byte-level BPE, 49,408 tokens) of the ``open_clip`` package, for image–text
training (docs/data.md, "Image–text pairs").

A caption becomes ``<|startoftext|>``, its BPE tokens, ``<|endoftext|>``, zero padded to ``context_length``;
a longer one is cut and its last token replaced by ``<|endoftext|>``, so a text model that reads the
end-of-text position always finds it. The text is first cleaned as open_clip's default does (``ftfy``,
HTML unescape, whitespace collapsed, lower case). The vocabulary file ships with open_clip: nothing is
downloaded.

``import open_clip`` costs ~10 s (it imports its models, timm and transformers), and importing
``open_clip.tokenizer`` runs the package's ``__init__`` first. The tokenizer module itself imports only
ftfy, regex, numpy and torch, so it is loaded on its own from the installed package's file (0.3 s).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from torch import Tensor

_MODULE: ModuleType | None = None


def _open_clip_tokenizer() -> ModuleType:
    """open_clip's ``tokenizer`` module, without importing the rest of open_clip (unless it already is)."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    if "open_clip" in sys.modules:  # imported anyway: the usual module is free
        import open_clip.tokenizer

        _MODULE = open_clip.tokenizer
        return _MODULE
    spec = importlib.util.find_spec("open_clip")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the CLIP tokenizer needs the open_clip package (pip install open-clip-torch)")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("opendino._open_clip_tokenizer", path)
    if module_spec is None or module_spec.loader is None or not path.is_file():
        import open_clip.tokenizer  # an unusual install (zipped, frozen): take the slow import

        _MODULE = open_clip.tokenizer
        return _MODULE
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)  # it has no relative imports (checked: open_clip 3.3)
    except ImportError:  # a version that has some: take the slow import
        import open_clip.tokenizer as module
    _MODULE = module
    return module


class Tokenizer:
    """CLIP BPE tokenizer: ``tokenizer(texts) -> LongTensor [N, context_length]``."""

    def __init__(self, context_length: int = 77) -> None:
        if context_length < 2:
            raise ValueError(f"context_length={context_length}: need room for the start and end tokens")
        # The explicit settings are open_clip's defaults today: pinned so that a new default cannot change
        # the tokens of a run (plain truncation, no reduction; "lower" cleaning).
        self._bpe = _open_clip_tokenizer().SimpleTokenizer(context_length=context_length, clean="lower")
        self.context_length = context_length
        self.vocab_size: int = self._bpe.vocab_size
        self.sot_token_id: int = self._bpe.sot_token_id
        self.eot_token_id: int = self._bpe.eot_token_id

    def __call__(self, texts: str | list[str]) -> Tensor:
        # open_clip's own call does exactly the rule of the module docstring (truncate, then end-of-text
        # as the last token; zeros after it); tests/test_captions.py pins it.
        return self._bpe([texts] if isinstance(texts, str) else list(texts), self.context_length)

    def decode(self, tokens: Tensor) -> list[str]:
        """The cleaned texts of ``[N, L]`` (or ``[L]``) tokens: what lies between the start token and the first
        end token (or the trailing zero padding). BPE marks word ends only, so punctuation comes back as a
        word of its own (``"red, blue"`` -> ``"red , blue"``)."""
        rows = tokens.view(1, -1) if tokens.dim() == 1 else tokens
        texts = []
        for row in rows.tolist():
            if row and row[0] == self.sot_token_id:
                row = row[1:]
            if self.eot_token_id in row:
                row = row[: row.index(self.eot_token_id)]
            else:  # no end token: strip the padding (0 is also a real token, "!", so only at the end)
                while row and row[-1] == 0:
                    row.pop()
            texts.append(" ".join(self._bpe.decode(row).split()))
        return texts

    def __repr__(self) -> str:
        return f"Tokenizer(context_length={self.context_length}, vocab_size={self.vocab_size})"
