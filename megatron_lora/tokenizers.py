"""Tokenizers by Megatron-LM's names: ``--tokenizer-type HuggingFaceTokenizer --tokenizer-model
DIR`` (a model's own tokenizer, loaded by transformers' AutoTokenizer from local files only,
never the network) or the self-contained byte tokenizer of the demos (``byte``: UTF-8 bytes as
ids 0..255 plus an end-of-document id 256; no files, no network). ``build_tokenizer`` builds
either.

Both are megatron ``MegatronTokenizerBase`` s, what megatron's GPT datasets expect."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from megatron.core.tokenizers import MegatronTokenizerBase

from .errors import DataError

TOKENIZER_NAME = "byte"
HF_TOKENIZER = "HuggingFaceTokenizer"
# files that make a directory a tokenizer directory (any one of them)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# every file a tokenizer directory may hold: what identifies it (its hash) and what travels
# with it (export-hf copies them)
TOKENIZER_ALL_FILES = TOKENIZER_FILES + (
    "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "added_tokens.json",
    "merges.txt", "vocab.txt")


# --- byte --------------------------------------------------------------------------------------

# megatron's convention (NullTokenizer, MegatronDataset's _PAD_TOKEN_ID) for "no such token"
_NO_TOKEN = -1


class _TokenizerBase(MegatronTokenizerBase):
    """The names megatron's code reads besides ``eod`` and ``pad``: EOS is the end-of-document
    token, and the ``*_id`` spellings are the same ids."""

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def eos_id(self) -> int:
        return self.eod

    @property
    def pad_id(self) -> int:
        return self.pad

    @property
    def bos_id(self) -> int:
        return self.bos


class ByteTokenizer(_TokenizerBase):
    """UTF-8 bytes as token ids 0..255; id 256 ends a document. ``vocab_size == 257``.

    There is no padding, BOS, CLS, SEP or MASK token: those ids are -1, which megatron's GPT
    dataset reads as "no pad token" (it then never masks real tokens as padding).
    """

    def __init__(self) -> None:
        super().__init__(path="", config={"library": TOKENIZER_NAME})

    @property
    def unique_identifiers(self) -> "OrderedDict[str, str]":
        # part of the hash that names megatron's index cache files; the class keeps the path it
        # had in megatron_lora.data, so the caches written before the move stay valid
        return OrderedDict(
            [("class", "megatron_lora.data.ByteTokenizer"),
             ("vocab_size", str(self.vocab_size)), ("eod", str(self.eod))]
        )

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eod(self) -> int:
        return 256

    @property
    def pad(self) -> int:
        return _NO_TOKEN

    bos = cls = sep = mask = pad

    @property
    def vocab(self) -> Dict[str, int]:
        table = {f"<0x{i:02X}>": i for i in range(256)}
        table["<eod>"] = self.eod
        return table

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return {i: token for token, i in self.vocab.items()}

    def tokenize(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; end-of-document ids are dropped, broken UTF-8 becomes U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i <= self.eod]
        if bad:
            raise DataError(f"token ids outside 0..{self.eod}: {bad[:5]}")
        return bytes(i for i in ids if i != self.eod).decode("utf-8", errors="replace")

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("ByteTokenizer has no chat template")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eod=256)"


# --- Hugging Face ------------------------------------------------------------------------------


def holds_tokenizer(path) -> bool:
    return path is not None and any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


class HuggingFaceTokenizer(_TokenizerBase):
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
        for name in TOKENIZER_ALL_FILES:
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
    def pad(self) -> int:
        return -1 if self.hf.pad_token_id is None else self.hf.pad_token_id


    @property
    def bos(self) -> int:
        return -1 if self.hf.bos_token_id is None else self.hf.bos_token_id


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


def _byte_tokenizer(tokenizer_model) -> ByteTokenizer:
    if tokenizer_model:
        raise DataError(f"--tokenizer-model {tokenizer_model} is for --tokenizer-type "
                        f"{HF_TOKENIZER}; the byte tokenizer takes no files")
    return ByteTokenizer()


def _hugging_face_tokenizer(tokenizer_model) -> HuggingFaceTokenizer:
    if not tokenizer_model:
        raise DataError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR")
    return HuggingFaceTokenizer(tokenizer_model)


# --tokenizer-type -> factory of the tokenizer from --tokenizer-model (None when not given)
_TOKENIZERS: Dict[str, Callable[[Optional[str]], MegatronTokenizerBase]] = {
    HF_TOKENIZER: _hugging_face_tokenizer,
    TOKENIZER_NAME: _byte_tokenizer,
}
TOKENIZER_TYPES = tuple(_TOKENIZERS)


def build_tokenizer(tokenizer_type: Optional[str], tokenizer_model=None) -> MegatronTokenizerBase:
    """The tokenizer a run asks for: ``HuggingFaceTokenizer`` with its directory, or ``byte``."""
    tokenizer_type = tokenizer_type or TOKENIZER_NAME
    if tokenizer_type not in _TOKENIZERS:
        raise DataError(f"--tokenizer-type {tokenizer_type!r} is not supported; valid: "
                        f"{', '.join(TOKENIZER_TYPES)}")
    return _TOKENIZERS[tokenizer_type](tokenizer_model)


def get_tokenizer(name: str = TOKENIZER_NAME) -> MegatronTokenizerBase:
    """The tokenizer called ``name`` among those that need no files (the experiment YAML's
    ``tokenizer``); build_tokenizer with no directory."""
    if name != TOKENIZER_NAME:
        raise DataError(f"unknown tokenizer {name!r}; valid names: {TOKENIZER_NAME}")
    return build_tokenizer(name)
