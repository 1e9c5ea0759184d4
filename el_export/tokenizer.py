"""Text <-> ids at run time from the bundle's tokenizer.json (the `tokenizers` library, no transformers)."""

from pathlib import Path

import torch

from el_export.errors import InputError


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` (serialized as JSON): padding and truncation done here."""

    def __init__(self, tokenizer_json: str, pad_token_id: int | None, padding_side: str = "right"):
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_str(tokenizer_json)
        self._tok.no_padding()
        self._tok.no_truncation()
        self._truncating = HFTokenizer.from_str(tokenizer_json)  # its own object: encode() stays thread-safe
        self._truncating.no_padding()
        self.pad_token_id = 0 if pad_token_id is None else pad_token_id
        self.padding_side = padding_side

    @classmethod
    def from_bundle(cls, bundle_dir: Path, manifest) -> "Tokenizer | None":
        if manifest.tokenizer is None:
            return None
        return cls((bundle_dir / manifest.tokenizer).read_text(encoding="utf-8"), *padding(manifest))

    @classmethod
    def from_hf(cls, tokenizer, manifest) -> "Tokenizer | None":
        """From a `transformers` fast tokenizer (None, or a slow one, gives None)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        return cls(backend.to_str(), *padding(manifest))

    def encode(self, texts: list[str], max_length: int | None = None, truncation: bool = False):
        """Texts -> (input_ids, attention_mask) int64 [B, S], padded on `padding_side`.

        Raises:
            InputError: an empty text, or one longer than max_length without truncation.
        """
        if not texts:
            raise InputError("no input texts were given")
        encoded = []
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"input {i} is empty; give non-empty text")
            ids = self._tok.encode(text).ids
            if max_length is not None and len(ids) > max_length:
                if not truncation:
                    raise InputError(
                        f"input {i} is {len(ids)} tokens but the model takes at most {max_length}; "
                        "shorten it or pass truncation=True (--truncate) to cut it"
                    )
                self._truncating.enable_truncation(max_length)
                ids = self._truncating.encode(text).ids  # cuts the text, keeps the special tokens
            encoded.append(ids)
        return pad_ids(encoded, self.pad_token_id, self.padding_side)

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [self._tok.decode(row, skip_special_tokens=True) for row in ids.tolist()]


def pad_ids(rows: list[list[int]], pad_token_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids, attention_mask) int64 [B, S], padded on `side` ("left" or "right")."""
    S = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), S), pad_token_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), S), dtype=torch.int64)
    for i, ids in enumerate(rows):
        cols = slice(S - len(ids), S) if side == "left" else slice(0, len(ids))
        input_ids[i, cols] = torch.tensor(ids, dtype=torch.int64)
        mask[i, cols] = 1
    return input_ids, mask


def padding(manifest) -> tuple[int | None, str]:
    """Pad id (HF falls back to eos) and side: decoder-only prompts are left-padded, as HF requires."""
    tokens = manifest.special_tokens
    pad = tokens.get("pad_token_id")
    if pad is None:
        eos = tokens.get("eos_token_id")
        pad = eos[0] if isinstance(eos, list) else eos
    return pad, "left" if manifest.kind == "decoder-only" else "right"
