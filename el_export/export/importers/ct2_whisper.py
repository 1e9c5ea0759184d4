"""Import a CTranslate2 Whisper model directory (faster-whisper's format) as a transformers checkpoint.

CTranslate2's `model.bin` (binary version <= 6) holds named arrays. Its Whisper converter fuses
q/k/v into one matrix for self-attention and k/v for cross-attention (with a zero key bias, which HF
does not have), and aliases the output projection to the token embedding. This inverts that, in
float32, and writes config, generation config, tokenizer and feature-extractor settings beside it.
"""

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch

from el_export.contract.files import replacing_directory
from el_export.errors import CheckpointError, InvalidArgumentError

MARKER = "el_export_import.json"  # what this importer wrote, so that --overwrite replaces nothing else
_IMPORTER = "ct2-whisper"
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}  # CTranslate2's DataType order


def read_model_bin(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """CTranslate2 model.bin -> (spec name, variables), aliases resolved."""
    data = path.read_bytes()
    offset = 0

    def take(fmt: str):
        nonlocal offset
        value = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return value[0]

    def string() -> str:
        nonlocal offset
        n = take("H")
        text = data[offset : offset + n - 1].decode()
        offset += n
        return text

    try:
        version = take("I")
        if version > 6:
            raise CheckpointError(f"{path} is CTranslate2 binary version {version}; this importer reads up to 6")
        spec, _revision, count = string(), take("I"), take("I")
        variables = {}
        for _ in range(count):
            name = string()
            shape = [take("I") for _ in range(take("B"))]
            dtype, size = take("B"), take("I")
            if dtype not in _DTYPES:
                raise CheckpointError(f"{path}: variable {name} has an unsupported dtype id {dtype}")
            variables[name] = np.frombuffer(data, _DTYPES[dtype], size // np.dtype(_DTYPES[dtype]).itemsize, offset)
            variables[name] = variables[name].reshape(shape)
            offset += size
        for _ in range(take("I")):
            alias, target = string(), string()
            variables[alias] = variables[target]
    except struct.error:
        raise CheckpointError(f"{path} is truncated or not a CTranslate2 model") from None
    return spec, variables


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float32))


def _layers(variables: dict, prefix: str) -> int:
    return len({m.group(1) for name in variables if (m := re.match(rf"^{prefix}/layer_(\d+)/", name))})


def import_whisper(ct2_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a `WhisperForConditionalGeneration` checkpoint equivalent to a CTranslate2 Whisper model, atomically
    (a failure leaves nothing at `out_dir`).

    Args:
        overwrite: replace an existing `out_dir`, if it is empty or a checkpoint this importer wrote (never
            anything else).

    Raises:
        CheckpointError: the directory is not a CTranslate2 Whisper model.
        InvalidArgumentError: `out_dir` exists (without `overwrite`), or is not a checkpoint this importer wrote.
    """
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    for name in ("model.bin", "config.json", "tokenizer.json"):
        if not (ct2_dir / name).is_file():
            raise CheckpointError(f"{ct2_dir} has no {name}: not a CTranslate2 Whisper model directory")
    _check_out(out_dir, overwrite)
    spec, v = read_model_bin(ct2_dir / "model.bin")
    if spec != "WhisperSpec":
        raise CheckpointError(f"{ct2_dir} holds a CTranslate2 {spec}, not a WhisperSpec")
    ct2_config = json.loads((ct2_dir / "config.json").read_text())
    tokenizer_json = json.loads((ct2_dir / "tokenizer.json").read_text())
    special = {t["content"]: t["id"] for t in tokenizer_json["added_tokens"]}

    vocab, d = v["decoder/embeddings/weight"].shape
    config = WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=v["encoder/conv1/weight"].shape[1],
        d_model=d,
        encoder_layers=_layers(v, "encoder"),
        decoder_layers=_layers(v, "decoder"),
        encoder_attention_heads=int(v["encoder/num_heads"]),
        decoder_attention_heads=int(v["decoder/num_heads"]),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        **_tokens(ct2_config, special),
    )
    state = _hf_state(v, config)
    model = WhisperForConditionalGeneration(config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "proj_out.weight"]  # tied to the token embedding
    if missing or unexpected:
        raise CheckpointError(
            f"{ct2_dir}: weights do not map onto Whisper (missing {missing}; unexpected {unexpected})"[:300]
        )
    model.generation_config = _generation_config(GenerationConfig, config, ct2_config, special)
    with replacing_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        (tmp / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
        (tmp / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
                        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
        )  # fmt: skip
        WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"importer": _IMPORTER, "source": str(ct2_dir.absolute())}) + "\n")
    return out_dir


def _check_out(out_dir: Path, overwrite: bool) -> None:
    """An existing `out_dir` is replaced only with `overwrite`, and only when it is empty or holds this importer's
    MARKER: a directory of anything else is never removed."""
    if not (out_dir.exists() or out_dir.is_symlink()):
        return
    if not overwrite:
        raise InvalidArgumentError(f"{out_dir} already exists; choose another --out or pass --overwrite")
    if out_dir.is_symlink() or not out_dir.is_dir() or not (_written_here(out_dir) or not any(out_dir.iterdir())):
        raise InvalidArgumentError(
            f"{out_dir} is not a checkpoint that import-ct2 wrote (no {MARKER}) nor an empty directory; --overwrite "
            "replaces only those: choose another --out"
        )


def _written_here(directory: Path) -> bool:
    try:
        data = json.loads((directory / MARKER).read_bytes())
    except (OSError, ValueError):  # absent, unreadable or not JSON: not ours to replace
        return False
    return isinstance(data, dict) and data.get("importer") == _IMPORTER


def _hf_state(v: dict, config) -> dict[str, torch.Tensor]:
    d = config.d_model
    state = {
        "model.encoder.conv1.weight": v["encoder/conv1/weight"],
        "model.encoder.conv1.bias": v["encoder/conv1/bias"],
        "model.encoder.conv2.weight": v["encoder/conv2/weight"],
        "model.encoder.conv2.bias": v["encoder/conv2/bias"],
        "model.encoder.embed_positions.weight": v["encoder/position_encodings/encodings"],
        "model.decoder.embed_tokens.weight": v["decoder/embeddings/weight"],
        "model.decoder.embed_positions.weight": v["decoder/position_encodings/encodings"],
    }
    for stack, n_layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        state[f"model.{stack}.layer_norm.weight"] = v[f"{stack}/layer_norm/gamma"]
        state[f"model.{stack}.layer_norm.bias"] = v[f"{stack}/layer_norm/beta"]
        for i in range(n_layers):
            src, dst = f"{stack}/layer_{i}", f"model.{stack}.layers.{i}"
            fused_w, fused_b = v[f"{src}/self_attention/linear_0/weight"], v[f"{src}/self_attention/linear_0/bias"]
            for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                state[f"{dst}.self_attn.{proj}.weight"] = fused_w[j * d : (j + 1) * d]
                if proj != "k_proj":  # HF's key projection has no bias (CTranslate2 stores zeros)
                    state[f"{dst}.self_attn.{proj}.bias"] = fused_b[j * d : (j + 1) * d]
            _linear(state, v, f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
            _norm(state, v, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
            _linear(state, v, f"{src}/ffn/linear_0", f"{dst}.fc1")
            _linear(state, v, f"{src}/ffn/linear_1", f"{dst}.fc2")
            _norm(state, v, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
            if stack == "decoder":
                _linear(state, v, f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
                kv_w, kv_b = v[f"{src}/attention/linear_1/weight"], v[f"{src}/attention/linear_1/bias"]
                state[f"{dst}.encoder_attn.k_proj.weight"] = kv_w[:d]
                state[f"{dst}.encoder_attn.v_proj.weight"] = kv_w[d:]
                state[f"{dst}.encoder_attn.v_proj.bias"] = kv_b[d:]
                _linear(state, v, f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
                _norm(state, v, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
    return {name: _tensor(array) for name, array in state.items()}


def _linear(state, v, src, dst):
    state[f"{dst}.weight"], state[f"{dst}.bias"] = v[f"{src}/weight"], v[f"{src}/bias"]


def _norm(state, v, src, dst):
    state[f"{dst}.weight"], state[f"{dst}.bias"] = v[f"{src}/gamma"], v[f"{src}/beta"]


def _tokens(ct2_config: dict, special: dict) -> dict:
    """Special and suppressed tokens, shared by the model config and the generation config."""
    return dict(
        bos_token_id=special["<|endoftext|>"],
        eos_token_id=special["<|endoftext|>"],
        pad_token_id=special["<|endoftext|>"],
        decoder_start_token_id=special["<|startoftranscript|>"],
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
    )


def _generation_config(GenerationConfig, config, ct2_config: dict, special: dict):
    """The generation config openai's checkpoints ship, from CTranslate2's config and the tokenizer."""
    multilingual = config.vocab_size >= 51865
    settings = dict(
        max_length=config.max_target_positions,
        **_tokens(ct2_config, special),
        alignment_heads=ct2_config.get("alignment_heads"),
        no_timestamps_token_id=special["<|notimestamps|>"],
        prev_sot_token_id=special["<|startofprev|>"],
        is_multilingual=multilingual,
        return_timestamps=False,
        max_initial_timestamp_index=50,
    )
    if multilingual:
        lang_ids = set(ct2_config.get("lang_ids", []))
        settings["lang_to_id"] = {tok: i for tok, i in special.items() if i in lang_ids}
        settings["task_to_id"] = {"transcribe": special["<|transcribe|>"], "translate": special["<|translate|>"]}
        settings["forced_decoder_ids"] = [[1, None], [2, special["<|transcribe|>"]]]  # as openai's checkpoints
    return GenerationConfig(**settings)
