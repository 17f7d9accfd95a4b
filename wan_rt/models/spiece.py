"""A SentencePiece model (`spiece.model`) for a tokenizer folder that has only tokenizer.json.

transformers 5 saves the umT5 tokenizer as tokenizer.json alone (a Unigram model: pieces,
scores, the precompiled NFKC charsmap, Metaspace). The C++ runtime tokenizes with SentencePiece,
so this writes the same tokenizer back as a SentencePiece ModelProto (sentencepiece_model_pb2):
every piece with its score and type, the special ids, and the normalizer spec. What cannot be
said in SentencePiece's terms (a BPE/WordPiece model, another normalizer) is one ValueError.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Optional, Union

SPIECE = "spiece.model"
TOKENIZER_JSON = "tokenizer.json"
# sentencepiece_model.proto: ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6


def _flatten(node: Optional[dict], key: str) -> list[dict]:
    if not node:
        return []
    return [n for child in node[key] for n in _flatten(child, key)] if node.get("type") == "Sequence" else [node]


def spiece_from_tokenizer_json(path: Union[str, Path]) -> bytes:
    """tokenizer.json (Unigram) -> a serialized SentencePiece ModelProto."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "Unigram":
        raise ValueError(f"{path}: a {model.get('type')} tokenizer; only Unigram ones (umT5's) convert to SentencePiece")
    normalizers = _flatten(data.get("normalizer"), "normalizers")
    pre_tokenizers = _flatten(data.get("pre_tokenizer"), "pretokenizers")
    charsmap = b""
    collapses_spaces = False
    for n in normalizers:
        if n["type"] == "Precompiled":
            charsmap = base64.b64decode(n.get("precompiled_charsmap") or "")
        elif n["type"] == "Replace" and n.get("pattern", {}).get("Regex") == " {2,}":
            collapses_spaces = True
        elif n["type"] not in ("Strip",):
            raise ValueError(f"{path}: normalizer {n['type']} has no SentencePiece equivalent")
    metaspace = next((p for p in pre_tokenizers if p["type"] == "Metaspace"), None)
    if metaspace is None:
        raise ValueError(f"{path}: no Metaspace pre-tokenizer; not a SentencePiece-made tokenizer")
    collapses_spaces |= any(p["type"] == "WhitespaceSplit" for p in pre_tokenizers)

    added = {t["content"]: t for t in data.get("added_tokens", [])}
    proto = pb.ModelProto()
    unk_id = model.get("unk_id")
    ids: dict[str, int] = {}
    for i, (piece, score) in enumerate(model["vocab"]):
        kind = _NORMAL
        if i == unk_id:
            kind = _UNKNOWN
        elif piece in added:
            kind = _CONTROL if added[piece].get("special") else _USER_DEFINED
        elif model.get("byte_fallback") and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            kind = _BYTE
        proto.pieces.add(piece=piece, score=float(score), type=kind)
        ids.setdefault(piece, i)
    trainer = proto.trainer_spec
    trainer.model_type = pb.TrainerSpec.UNIGRAM
    trainer.vocab_size = len(model["vocab"])
    trainer.unk_id = -1 if unk_id is None else int(unk_id)
    trainer.pad_id = ids.get("<pad>", -1)
    trainer.eos_id = ids.get("</s>", -1)
    trainer.bos_id = ids.get("<s>", -1)
    trainer.byte_fallback = bool(model.get("byte_fallback"))
    trainer.hard_vocab_limit = False
    norm = proto.normalizer_spec
    norm.name = "nmt_nfkc" if charsmap else "identity"
    norm.precompiled_charsmap = charsmap
    # Metaspace "always"/"first" (older files: add_prefix_space) is SentencePiece's dummy prefix.
    norm.add_dummy_prefix = metaspace.get("prepend_scheme", "always" if metaspace.get("add_prefix_space", True)
                                          else "never") != "never"
    norm.remove_extra_whitespaces = collapses_spaces
    norm.escape_whitespaces = True
    return proto.SerializeToString()


def spiece_model_bytes(folder: Union[str, Path]) -> Optional[bytes]:
    """The tokenizer folder's spiece.model, else one made from its tokenizer.json; None when it has
    neither."""
    folder = Path(folder)
    if (folder / SPIECE).is_file():
        return (folder / SPIECE).read_bytes()
    if (folder / TOKENIZER_JSON).is_file():
        return spiece_from_tokenizer_json(folder / TOKENIZER_JSON)
    return None
