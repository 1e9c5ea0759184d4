"""Every contact with a Hugging Face checkpoint: find it, check it carries no code, read its weights, tokenizer
and feature extractor with `transformers` (never remote code, never a prompt, never a pickle).
"""

import json
import re
from pathlib import Path

from el_export import logs
from el_export.errors import CheckpointError, UnsupportedModelError, first_line
from el_export.families import family_for


def load_checkpoint(model: str):
    """Load an HF checkpoint (local directory, or hub id when a hub is reachable) and its tokenizer.

    Nothing of the checkpoint runs: one that ships Python (an `auto_map` in any of its JSON files) or only pickle
    weights is refused before transformers reads it, and transformers is never allowed remote code. The config is
    read first so an unsupported architecture is refused before any weights load, and every tensor the model needs
    must be in the checkpoint (transformers would fill a gap with random values).

    Returns:
        (model, tokenizer); the tokenizer is None, with a warning on stderr, when the checkpoint has no tokenizer
        files (the bundle then takes and returns token ids).

    Raises:
        CheckpointError: not found, unreadable, inconsistent, missing weights, or pickle weights only.
        UnsupportedModelError: the architecture is not supported, or the checkpoint ships its own code.
    """
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    directory = checkpoint_directory(model)
    try:
        config = _pretrained(AutoConfig, directory)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the config of {model!r}: {first_line(e)}") from None
    except StrictDataclassError as e:  # a field of the wrong type: "Validation error for field 'd_model': ..."
        detail = " ".join(line.strip() for line in str(e).splitlines()).split(". Errors:")[0]
        raise CheckpointError(f"config.json of {model!r} is invalid: {detail}; fix config.json") from None
    family = family_for(config)
    names = _safetensors_names(directory)  # before transformers opens a weight file
    return _read_weights(directory, family, model, names), _read_tokenizer(directory, model)


def load_feature_extractor(model: str):
    """A checkpoint's feature extractor, if it is a speech model (None otherwise); read as `load_checkpoint` reads."""
    from transformers import AutoFeatureExtractor

    try:
        return _pretrained(AutoFeatureExtractor, checkpoint_directory(model))
    except (OSError, ValueError):
        return None


# A hub id is fetched as these files only (never pickles or Python), then read like a local directory.
_HUB_FILES = ["*.json", "model*.safetensors", "*.txt", "*.model", "*.spm", "*.tiktoken", "*.jinja"]
_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_LISTED = 30  # names shown in one error or warning line
# Files a tokenizer is read from (fast, BPE, WordPiece, SentencePiece, tiktoken): without any, there is none to read.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "merges.txt", "*.model", "*.spm", "*.tiktoken")


def checkpoint_directory(model: str) -> Path:
    """The local directory of a checkpoint (a hub id is downloaded first), its JSON files checked for code.

    A path-like argument (./ ~ / .., more than one slash, or a parent directory that exists here) that does not
    exist is refused at once, instead of being sent to the hub as an id.

    Raises:
        CheckpointError: not found, not a checkpoint, or unreadable JSON.
        UnsupportedModelError: one of its JSON files has an `auto_map` (the checkpoint's own Python).
    """
    local = Path(model).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise CheckpointError(f"{model} is not a Hugging Face checkpoint directory (no config.json)")
        directory = local
    elif model.startswith((".", "/", "~")) or model.count("/") > 1 or ("/" in model and local.parent.is_dir()):
        raise CheckpointError(f"checkpoint directory {model} does not exist; check the path")
    else:
        from huggingface_hub import snapshot_download

        try:
            directory = Path(snapshot_download(model, allow_patterns=_HUB_FILES))
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"{model!r} is neither a local directory nor served by the hub: {first_line(e)}"
            ) from None
    for path in sorted(directory.glob("*.json")):
        data = _read_json(path)
        if isinstance(data, dict) and any("auto_map" in d for d in (data, *data.values()) if isinstance(d, dict)):
            raise UnsupportedModelError(
                f"{path.name} of {model} has an auto_map: the checkpoint ships its own Python, which el-export "
                "never runs; use a checkpoint of a supported architecture without custom code (or delete auto_map)"
            )
    return directory


def _read_json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({first_line(e)}); re-download the checkpoint") from None


def _safetensors_names(directory: Path) -> set[str]:
    """Every tensor name in the checkpoint's safetensors files, each file's header checked; pickles refused."""
    from safetensors import SafetensorError, safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        data = _read_json(index)
        shards = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(shards, dict) or not all(isinstance(f, str) and f == Path(f).name for f in shards.values()):
            raise CheckpointError(f"{index} has no weight_map of file names beside it; re-download the checkpoint")
        files = sorted(set(shards.values()))
    else:
        files = ["model.safetensors"] if (directory / "model.safetensors").is_file() else []
    if not files:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLES)
        if pickles:
            raise CheckpointError(
                f"{directory} has pickle weights ({', '.join(pickles)}), which el-export never loads (unpickling "
                "runs code); convert them to model.safetensors where you trust them (transformers' save_pretrained)"
            )
        raise CheckpointError(f"{directory} has no model.safetensors; el-export reads safetensors weights only")
    names = set()
    for name in files:
        try:
            with safe_open(directory / name, "pt") as f:
                names.update(f.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{directory / name} is not a readable safetensors file ({first_line(e)}); re-download or re-save it"
            ) from None
    return names


def _pretrained(auto, directory: Path, **kwargs):
    """`auto.from_pretrained` on a checked local checkpoint directory: never remote code (so never a prompt), never
    the hub, and transformers' warnings (its MISSING table, config notes) kept off stderr: el-export reports what
    matters in its own lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with logs.quiet_transformers():
        return auto.from_pretrained(str(directory), trust_remote_code=False, local_files_only=True, **kwargs)


def _read_weights(directory: Path, family, model: str, names: set[str]):
    """The HF model with every tensor its config needs from the checkpoint; unused tensors named in a warning."""
    import transformers

    auto = getattr(transformers, family.auto_model)
    try:
        hf_model, info = _pretrained(auto, directory, use_safetensors=True, output_loading_info=True,
                                     ignore_mismatched_sizes=True)  # fmt: skip
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load the weights of {model!r}: {first_line(e)}") from None
    missing = sorted(info["missing_keys"])
    problems = [f"{len(missing)} tensors are missing: {_names(missing)}"] if missing else []
    problems += [f"{key} is {tuple(got)}, the config needs {tuple(want)}" for key, got, want in
                 sorted(info["mismatched_keys"])]  # fmt: skip
    if problems:
        raise CheckpointError(
            f"{model} does not hold the weights its config needs ({'; '.join(problems)}); transformers would fill "
            "them with random values: use the complete checkpoint"
        )
    if info["unexpected_keys"]:
        unused = sorted(info["unexpected_keys"])
        logs.warn(f"{model} has {len(unused)} tensors its config does not use, ignored: {_names(unused)}")
    # Saved buffers transformers fills with a default when absent, unlike the tables it recomputes (never saved):
    # BART-like final_logits_bias (zeros), which older checkpoints lack.
    saved = hf_model.state_dict().keys()
    defaulted = [k for k, _ in hf_model.named_buffers() if k in saved and k not in names
                 and _matches(k, hf_model._keys_to_ignore_on_load_missing)
                 and not _matches(k, hf_model._keys_to_ignore_on_save)]  # fmt: skip
    if defaulted:
        logs.warn(f"{model} has no {_names(defaulted)}; using transformers' default")
    return hf_model.eval()


def _matches(key: str, patterns) -> bool:
    """Whether a state-dict key matches one of a transformers model's key patterns (regular expressions)."""
    return any(re.search(p, key) for p in patterns or ())


def _names(keys: list[str]) -> str:
    more = f" and {len(keys) - _LISTED} more" if len(keys) > _LISTED else ""
    return ", ".join(keys[:_LISTED]) + more


def _read_tokenizer(directory: Path, model: str):
    """The checkpoint's tokenizer, or None when it has no tokenizer files: transformers would otherwise build a
    stand-in of the class's special tokens alone (a 5-token BART tokenizer) and text would decode to ""."""
    from transformers import AutoTokenizer

    if any(any(directory.glob(pattern)) for pattern in _TOKENIZER_FILES):
        try:
            tokenizer = _pretrained(AutoTokenizer, directory)
        except Exception as e:  # the tokenizers library raises bare Exception for a malformed tokenizer.json
            raise CheckpointError(
                f"cannot read the tokenizer of {model!r} ({first_line(e)}); fix its tokenizer files, or remove them "
                "to export a bundle that takes token ids"
            ) from None
        if any((directory / name).is_file() for name in tokenizer.vocab_files_names.values()):
            return tokenizer
    logs.warn(f"{model} has no tokenizer files; the bundle takes and returns token ids only")
    return None
