"""Tokenizers by Megatron-LM's names: ``--tokenizer-type HuggingFaceTokenizer --tokenizer-model
DIR`` (a model's own tokenizer, loaded by transformers' AutoTokenizer from local files only,
never the network) or the self-contained byte tokenizer of the demos (``byte``).

Both are megatron ``MegatronTokenizerBase`` s, what megatron's GPT datasets expect."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import List, Optional, Sequence

from megatron.core.tokenizers import MegatronTokenizerBase

from .data import TOKENIZER_NAME, DataError, get_tokenizer

HF_TOKENIZER = "HuggingFaceTokenizer"
TOKENIZER_TYPES = (HF_TOKENIZER, TOKENIZER_NAME)
# files that make a directory a tokenizer directory (any one of them)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def holds_tokenizer(path) -> bool:
    return path is not None and any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


class HuggingFaceTokenizer(MegatronTokenizerBase):
    """A transformers tokenizer read from ``path`` with local files only. Documents are
    tokenized without special tokens (megatron's preprocessing appends the end-of-document
    id, the tokenizer's EOS); ``vocab_size`` counts added tokens too."""

    def __init__(self, path) -> None:
        from transformers import AutoTokenizer  # heavy; only this tokenizer needs it

        path = Path(path)
        if not path.is_dir():
            raise DataError(f"--tokenizer-model {path} is not a directory")
        if not holds_tokenizer(path):
            raise DataError(f"--tokenizer-model {path} holds no tokenizer files (expected one of "
                            f"{', '.join(TOKENIZER_FILES)})")
        try:
            # trust_remote_code=False: a tokenizer directory never runs code of its own
            self.hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                    trust_remote_code=False)
        except Exception as error:  # transformers raises many kinds; report the first line
            raise DataError(f"--tokenizer-model {path} cannot be loaded by transformers' "
                            f"AutoTokenizer: {str(error).strip().splitlines()[0][:300]}") from None
        super().__init__(path=str(path), config={"library": HF_TOKENIZER})
        self.path = path.resolve()
        digest = hashlib.sha256()
        for name in TOKENIZER_FILES + ("special_tokens_map.json", "chat_template.jinja"):
            if (path / name).is_file():
                digest.update(name.encode() + (path / name).read_bytes())
        self._digest = digest.hexdigest()[:16]

    @property
    def unique_identifiers(self) -> "OrderedDict[str, str]":
        # part of the hash that names megatron's index cache files
        return OrderedDict([("class", f"{type(self).__module__}.{type(self).__qualname__}"),
                            ("files", self._digest), ("vocab_size", str(self.vocab_size))])

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def eod(self) -> int:
        if self.hf.eos_token_id is None:
            raise DataError(f"the tokenizer in {self.path} has no EOS token to end documents")
        return self.hf.eos_token_id

    @property
    def eos(self) -> int:
        return self.eod

    eos_id = eos

    @property
    def pad(self) -> int:
        return -1 if self.hf.pad_token_id is None else self.hf.pad_token_id

    pad_id = pad

    @property
    def bos(self) -> int:
        return -1 if self.hf.bos_token_id is None else self.hf.bos_token_id

    bos_id = bos

    @property
    def vocab(self):
        return self.hf.get_vocab()

    @property
    def inv_vocab(self):
        return {i: token for token, i in self.vocab.items()}

    @property
    def chat_template(self) -> Optional[str]:
        return getattr(self.hf, "chat_template", None)

    def tokenize(self, text: str) -> List[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids])

    def apply_chat_template(self, conversation, **kwargs):
        return self.hf.apply_chat_template(conversation, **kwargs)

    def __repr__(self) -> str:
        return f"HuggingFaceTokenizer({self.path}, vocab_size={self.vocab_size})"


def build_tokenizer(tokenizer_type: Optional[str], tokenizer_model=None):
    """The tokenizer a run asks for: ``HuggingFaceTokenizer`` with its directory, or ``byte``."""
    tokenizer_type = tokenizer_type or TOKENIZER_NAME
    if tokenizer_type == HF_TOKENIZER:
        if not tokenizer_model:
            raise DataError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR")
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type not in TOKENIZER_TYPES:
        raise DataError(f"--tokenizer-type {tokenizer_type!r} is not supported; valid: "
                        f"{', '.join(TOKENIZER_TYPES)}")
    if tokenizer_model:
        raise DataError(f"--tokenizer-model {tokenizer_model} is for --tokenizer-type "
                        f"{HF_TOKENIZER}; the byte tokenizer takes no files")
    return get_tokenizer(tokenizer_type)
