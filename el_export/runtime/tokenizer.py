"""Text <-> ids at run time from the bundle's tokenizer.json (the `tokenizers` library, no transformers).

The tokenizer is bundle data run as code (regexes, normalizers): whatever it fails with, at load or on an
input, is a one-line BundleError naming it, a Rust panic included.
"""

import contextlib
from pathlib import Path

import torch

from el_export.contract.files import read_file
from el_export.errors import BundleError, InputError, InvalidArgumentError, first_line


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` (serialized as JSON): padding and truncation done here."""

    def __init__(
        self, tokenizer_json: str, pad_token_id: int | None, padding_side: str = "right", name: str = "tokenizer.json"
    ):
        self.name = name
        self._tok = self._parse(tokenizer_json)
        self._tok.no_padding()
        self._tok.no_truncation()
        self._truncating = self._parse(tokenizer_json)  # its own object: encode() stays thread-safe
        self._truncating.no_padding()
        self.pad_token_id = 0 if pad_token_id is None else pad_token_id
        self.padding_side = padding_side

    def _parse(self, tokenizer_json: str):
        from tokenizers import Tokenizer as HFTokenizer

        with self._failures("to load"):
            try:
                return HFTokenizer.from_str(tokenizer_json)
            except Exception as e:  # tokenizers raises plain Exception for every file it cannot read
                raise BundleError(
                    f"{self.name} is not a tokenizer the tokenizers library can read ({first_line(e)}); "
                    "re-export the bundle"
                ) from None

    @contextlib.contextmanager
    def _failures(self, doing: str):
        """A Rust panic in `tokenizers` (a catastrophic regex in a pre-tokenizer) as a BundleError. It arrives as
        pyo3's PanicException, a BaseException that cannot be imported: caught by its name, nothing else."""
        try:
            yield
        except BaseException as e:
            if type(e).__name__ != "PanicException":
                raise
            raise BundleError(
                f"the bundle's tokenizer {self.name} failed {doing} ({first_line(e)}); fix or re-export the tokenizer"
            ) from None

    @classmethod
    def from_bundle(cls, bundle_dir: Path, manifest, verify: bool = True) -> "Tokenizer | None":
        """The bundle's tokenizer, from the bytes whose sha256 was checked (unless `verify` is off).

        Raises:
            BundleError: missing, changed, not UTF-8, or not a tokenizer `tokenizers` can load.
        """
        if manifest.tokenizer is None:
            return None
        data = read_file(bundle_dir, manifest, manifest.tokenizer, verify)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BundleError(f"{manifest.tokenizer} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        return cls(text, *padding(manifest), name=manifest.tokenizer)

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
            with self._failures(f"on input {i}"):
                ids = self._tok.encode(text).ids
            if max_length is not None and len(ids) > max_length:
                if not truncation:
                    raise InputError(
                        f"input {i} is {len(ids)} tokens but the model takes at most {max_length}; "
                        "shorten it or pass truncation=True (--truncation) to cut it"
                    )
                self._truncating.enable_truncation(max_length)
                with self._failures(f"on input {i}"):
                    ids = self._truncating.encode(text).ids  # cuts the text, keeps the special tokens
            encoded.append(ids)
        return pad_ids(encoded, self.pad_token_id, self.padding_side)

    def prompt_ids(self, text: str) -> list[int]:
        """Whisper's previous-text prompt: [<|startofprev|>] + the ids of " " + text.strip(), as transformers'
        `WhisperTokenizer.get_prompt_ids` builds them, refusing text that encodes to a special token as it does
        (its bar, `all_special_ids[0]`, is <|endoftext|>: the lowest special id of a Whisper vocabulary).

        Raises:
            InvalidArgumentError: the tokenizer is not Whisper's, or the text holds a special token.
        """
        start = self._tok.token_to_id("<|startofprev|>")
        if start is None:
            raise InvalidArgumentError(f"{self.name} has no <|startofprev|> token: prompts need a Whisper bundle")
        with self._failures("on the prompt"):
            ids = self._tok.encode(" " + text.strip(), add_special_tokens=False).ids
        specials = (i for i, token in self._tok.get_added_tokens_decoder().items() if token.special)
        first_special = min(specials, default=start)
        special = next((i for i in ids if i >= first_special), None)
        if special is not None:
            raise InvalidArgumentError(
                f"the prompt holds the special token {self._tok.id_to_token(special)}; remove it from the text"
            )
        return [start, *ids]

    def decode(self, ids: torch.Tensor) -> list[str]:
        with self._failures("to decode"):
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
