"""Generation options: HF `generate`'s parameters, resolved once with HF's precedence and length rules.

Resolution mirrors transformers 5.23: user kwargs > the checkpoint's generation config > HF's global
defaults, then special-token fallbacks and the max/min length rules. Everything downstream reads only
the resolved `GenerationOptions`, so search never has to know where a value came from.
"""

import difflib
import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, NoReturn

from el_export.errors import InvalidArgumentError

# HF's `GenerationConfig._get_default_generation_params()`, restricted to the fields we implement.
_HF_DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "early_stopping": False,
    "num_beams": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "num_return_sequences": 1,
    "output_scores": False,
}

# An explicit None from the user overrides every default in HF; where HF then skips the feature we store
# the value that skips it. Fields not listed here (and not Optional) cannot be None: HF would crash.
_NONE_MEANS: dict[str, Any] = {
    "do_sample": False,
    "early_stopping": False,
    "output_scores": False,
    "min_length": 0,
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
}

# HF generation-config fields that never change the tokens or scores we return: any value is accepted.
_IGNORED = frozenset({
    "use_cache", "cache_implementation", "cache_config", "max_cache_len", "compile_config",
    "disable_compile", "prefill_chunk_size", "continuous_batching_config", "return_dict_in_generate",
    "is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind",
    "max_matching_ngram_size", "assistant_ensemble_weight", "speculation_type",
    "transformers_version", "_from_model_config",
})  # fmt: skip

# HF fields we do not implement, accepted only as None or the value under which HF ignores them too.
_INERT: dict[str, Any] = {
    "output_attentions": False, "output_hidden_states": False, "output_logits": False,
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None, "top_h": None,
    "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0, "remove_invalid_values": False,
    "renormalize_logits": False, "exponential_decay_length_penalty": None, "sequence_bias": None,
    "guidance_scale": 1.0, "num_beam_groups": 1, "diversity_penalty": 0.0, "penalty_alpha": None,
    "dola_layers": None, "constraints": None, "force_words_ids": None, "low_memory": False,
    "max_time": None, "stop_strings": None, "token_healing": False, "watermarking_config": None,
    "prompt_lookup_num_tokens": None, "assistant_early_exit": None, "use_mtp": False,
}  # fmt: skip


_INT64_MAX = 2**63 - 1  # token ids and lengths become int64 tensors
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes: [low, high)
# Logits divided by a smaller temperature overflow float32 to inf (1e8 / 1e-30 is still finite), softmax turns
# them into NaN and sampling fails: HF crashes in `torch.multinomial` there. Below this, sample greedily instead.
MIN_TEMPERATURE = 1e-30
# What each float field may be; HF's own checks are noted where HF takes more.
_FLOATS = {
    # HF takes NaN and inf and returns NaN sequence scores: which beams it keeps is then arbitrary.
    "length_penalty": "a finite number (1.0: scores are mean log-probabilities)",
    # HF's TemperatureLogitsWarper refuses NaN, takes inf: scores / inf are NaN where a token is masked (-inf),
    # and HF crashes in `torch.multinomial`.
    "temperature": f"a finite float >= {MIN_TEMPERATURE} (1.0 disables it)",
    # HF ignores NaN (`nan < 1.0` is False) and refuses values outside [0, 1] when it builds TopPLogitsWarper.
    "top_p": "a number in [0, 1] (1.0 disables it)",
    # HF's RepetitionPenaltyLogitsProcessor refuses NaN, takes inf (a repeated token's score becomes 0 or -inf).
    "repetition_penalty": "a finite float > 0 (1.0 disables it)",
}


def _fail(message: str) -> NoReturn:
    raise InvalidArgumentError(message)


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not minimum <= value <= _INT64_MAX:
        _fail(f"`{name}` must be an integer in [{minimum}, 2**63), got {value!r}; pass a valid value.")
    return int(value)


def _float(name: str, value: Any, valid: str) -> float:
    """A finite number. NaN and inf are refused even where HF takes them (see `_FLOATS`): they give NaN scores or
    a crash, and NaN slips past every later `<` check."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        _fail(f"`{name}` must be {valid}, got {value!r}.")
    return float(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(f"`{name}` must be True or False, got {value!r}.")
    return value


def _seed(value: Any) -> int:
    low, high = SEED_RANGE
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value < high:
        _fail(f"`seed` must be an integer in [-2**63, 2**64) (what torch.Generator takes), got {value!r}.")
    return int(value)


def _token_ids(name: str, value: Any) -> tuple[int, ...]:
    """An id or a list of ids, as a tuple (HF accepts both wherever a list of ids is allowed)."""
    items = value if isinstance(value, list | tuple) else [value]
    return tuple(_int(name, token, 0) for token in items)


@dataclass(frozen=True)
class TimestampRules:
    """Whisper's timestamp tokens: ids from `no_timestamps_token_id + 1` on, predicted in pairs after `begin_index`
    (the decoder prompt's length), the first at most `max_initial_timestamp_index` steps of 20 ms in."""

    no_timestamps_token_id: int
    begin_index: int
    max_initial_timestamp_index: int | None
    eos_token_id: int

    @property
    def timestamp_begin(self) -> int:
        return self.no_timestamps_token_id + 1


@dataclass(frozen=True)
class NoSpeechRule:
    """Record the probability of `token_id` at the first generated step. HF fixes `scores_are_logprobs` from the
    call's num_beams, so a sampled retry of a beam-search call reads its logits as log-probabilities too."""

    token_id: int
    scores_are_logprobs: bool


@dataclass(frozen=True)
class GenerationOptions:
    """Resolved generation parameters, named as in HF `generate` (build them with `resolve_options`).

    `max_length` and `min_length` are final: they already include the prompt and `max_new_tokens` /
    `min_new_tokens`. Token-id lists are tuples; `eos_token_id` is always a tuple (or None).
    Construction validates every field and raises `InvalidArgumentError` with a one-line message.
    """

    max_length: int = 20
    max_new_tokens: int | None = None
    min_length: int = 0
    min_new_tokens: int | None = None
    num_beams: int = 1
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int | None = None
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: tuple[int, ...] | None = None
    decoder_start_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] | None = None
    pad_token_id: int | None = None
    suppress_tokens: tuple[int, ...] | None = None
    begin_suppress_tokens: tuple[int, ...] | None = None
    output_scores: bool = False
    # Whisper's long-form rules (`el_export.runtime.longform` sets them; no `generate` argument reaches them):
    # timestamp pairs from this prompt length on (HF's WhisperTimeStampLogitsProcessor), the no-speech
    # probability of the first step (WhisperNoSpeechDetection), and each token's log-probability over the
    # scores rescaled by this factor (what HF's `_retrieve_avg_logprobs` reads for `logprob_threshold`).
    timestamps: "TimestampRules | None" = None
    no_speech: "NoSpeechRule | None" = None
    token_logprobs_rescale: float | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("max_length", "num_beams", "num_return_sequences"):
            put(name, _int(name, getattr(self, name), 1))
        for name in ("min_length", "top_k", "no_repeat_ngram_size"):
            put(name, _int(name, getattr(self, name), 0))
        for name, minimum in (("max_new_tokens", 1), ("min_new_tokens", 0)):
            if getattr(self, name) is not None:
                put(name, _int(name, getattr(self, name), minimum))
        if self.seed is not None:
            put("seed", _seed(self.seed))
        for name in ("do_sample", "output_scores"):
            _bool(name, getattr(self, name))
        self._check_float_types()
        for name, valid in _FLOATS.items():
            put(name, _float(name, getattr(self, name), valid))
        for name in ("forced_bos_token_id", "decoder_start_token_id", "bos_token_id", "pad_token_id"):
            if getattr(self, name) is not None:
                put(name, _int(name, getattr(self, name), 0))
        for name in ("forced_eos_token_id", "eos_token_id", "suppress_tokens", "begin_suppress_tokens"):
            if getattr(self, name) is not None:
                put(name, _token_ids(name, getattr(self, name)))
        self._check_combinations()
        if self.pad_token_id is None and self.eos_token_id:  # HF `_prepare_special_tokens`
            put("pad_token_id", self.eos_token_id[0])
        if self.bad_words_ids is not None:
            put("bad_words_ids", self._checked_bad_words())

    def _check_combinations(self) -> None:
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            _fail(f"`early_stopping` must be True, False or 'never', got {self.early_stopping!r}.")
        if self.eos_token_id == ():
            _fail("`eos_token_id` is an empty list; pass None to generate without an end token.")
        if self.num_return_sequences > 1 and self.num_beams == 1 and not self.do_sample:
            _fail(
                f"greedy search returns one sequence, got num_return_sequences={self.num_return_sequences}; "
                "set num_beams >= num_return_sequences or do_sample=True."
            )
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            _fail(
                f"num_return_sequences ({self.num_return_sequences}) > num_beams ({self.num_beams}); "
                "raise num_beams or lower num_return_sequences."
            )
        if self.repetition_penalty <= 0:
            _fail(f"`repetition_penalty` must be > 0, got {self.repetition_penalty}; 1.0 disables it.")
        if self.do_sample and self.temperature <= 0:
            _fail(f"`temperature` must be > 0 when sampling, got {self.temperature}; use do_sample=False.")
        if self.do_sample and self.temperature < MIN_TEMPERATURE:
            _fail(
                f"`temperature` {self.temperature} is below {MIN_TEMPERATURE}: the scaled logits overflow to inf and "
                "sampling fails; use do_sample=False for greedy decoding."
            )
        if self.do_sample and not 0.0 <= self.top_p <= 1.0:
            _fail(f"`top_p` must be in [0, 1], got {self.top_p}; 1.0 disables it.")
        for name in ("forced_bos_token_id", "forced_eos_token_id"):
            forced = getattr(self, name)
            forced = {forced} if isinstance(forced, int) else set(forced or ())
            if forced and self.suppress_tokens is not None and forced <= set(self.suppress_tokens):
                _fail(f"every token of `{name}` is also in `suppress_tokens`; remove it from one of them.")

    def _check_float_types(self) -> None:
        """HF's RepetitionPenalty and Temperature processors take only a float, and run only when the value is
        not 1.0 (temperature: only when sampling): where HF would refuse an integer, so do we."""
        for name, used in (("repetition_penalty", True), ("temperature", self.do_sample)):
            value = getattr(self, name)
            if used and isinstance(value, numbers.Integral) and not isinstance(value, bool) and value != 1:
                _fail(f"`{name}` must be a float, got the integer {value}; pass {value}.0 (HF refuses an integer).")

    def _checked_bad_words(self) -> tuple[tuple[int, ...], ...] | None:
        """HF's NoBadWordsLogitsProcessor checks, then drops entries that are a single eos token."""
        words = self.bad_words_ids
        if (
            not isinstance(words, list | tuple)
            or not words
            or not all(isinstance(word, list | tuple) and word for word in words)
        ):
            _fail(f"`bad_words_ids` must be a non-empty list of non-empty lists of token ids, got {words!r}.")
        words = tuple(_token_ids("bad_words_ids", list(word)) for word in words)
        kept = tuple(word for word in words if not (len(word) == 1 and word[0] in (self.eos_token_id or ())))
        return kept or None


_INTERNAL = frozenset({"timestamps", "no_speech", "token_logprobs_rescale"})  # set by the long-form loop
_FIELDS = frozenset(field.name for field in fields(GenerationOptions)) - _INTERNAL
_HF_FIELDS = _FIELDS - {"seed"}  # `seed` is ours: a checkpoint's config cannot set it


def resolve_options(
    model_defaults: dict[str, Any],
    *,
    prompt_length: int,
    is_encoder_decoder: bool,
    max_position_embeddings: int | None,
    **user_kwargs: Any,
) -> GenerationOptions:
    """Merge user kwargs over the checkpoint's generation config exactly as HF `generate` does.

    Args:
        model_defaults: the checkpoint's generation config as a plain dict (`to_diff_dict()`); keys
            HF does not know are ignored, as HF ignores custom entries.
        prompt_length: P, the decoder prompt length (decoder-only: the prompt; encoder-decoder: the
            decoder start, usually 1).
        is_encoder_decoder: whether the model has an encoder (decoder start falls back to bos).
        max_position_embeddings: caps the default max_length (20 + P) when nobody set max_length.
        **user_kwargs: HF `generate` arguments, plus `seed` for sampling.

    Returns:
        The resolved, validated options.

    Raises:
        InvalidArgumentError: an unknown or invalid argument, or a prompt that leaves no room to generate.
    """
    unknown = sorted(set(user_kwargs) - _FIELDS - _IGNORED - _INERT.keys())
    if unknown:
        _fail(f"unknown generation argument `{unknown[0]}`; {_did_you_mean(unknown[0], _FIELDS)}")
    model_known = {key: value for key, value in model_defaults.items() if key not in _IGNORED}
    _check_inert("the checkpoint's generation config", model_known)
    _check_inert("generate", user_kwargs)

    merged = dict(_HF_DEFAULTS)
    merged.update({k: v for k, v in model_known.items() if k in _HF_FIELDS and v is not None})
    merged.update({k: v for k, v in user_kwargs.items() if k in _FIELDS})
    merged.update({k: _NONE_MEANS[k] for k, v in merged.items() if v is None and k in _NONE_MEANS})

    # HF `_prepare_generated_length`.
    if merged.get("max_new_tokens") is not None:
        merged["max_length"] = _int("max_new_tokens", merged["max_new_tokens"], 1) + prompt_length
    elif user_kwargs.get("max_length") is None and model_defaults.get("max_length") is None:
        merged["max_length"] = _int("max_length", merged["max_length"], 0) + prompt_length
        if max_position_embeddings is not None:
            merged["max_length"] = min(merged["max_length"], max_position_embeddings)
    if merged.get("min_new_tokens") is not None:
        merged["min_length"] = _int("min_new_tokens", merged["min_new_tokens"], 0) + prompt_length

    if is_encoder_decoder and merged.get("decoder_start_token_id") is None:  # HF `_prepare_special_tokens`
        merged["decoder_start_token_id"] = merged.get("bos_token_id")
        if merged["decoder_start_token_id"] is None:
            _fail("encoder-decoder generation needs `decoder_start_token_id` or `bos_token_id`; pass one.")

    options = GenerationOptions(**merged)
    check_prompt_length(options, prompt_length)
    return options


def merge_generation_config(model_defaults: dict[str, Any], generation_config: Any) -> dict[str, Any]:
    """The checkpoint's defaults under a caller's `generation_config`, merged as HF `_prepare_generation_config`
    merges them: each field the config sets (not None) replaces the checkpoint's, the others stay the checkpoint's.
    `generate`'s kwargs then override both (`resolve_options`).

    Args:
        model_defaults: the checkpoint's generation config as a plain dict.
        generation_config: None; a transformers `GenerationConfig`, read through its `to_diff_dict()` (duck-typed:
            the runtime imports no transformers), its custom entries ignored as HF ignores them; or a dict of
            GenerationConfig fields, where an unknown key is refused (a misspelt field would go unseen).

    Returns:
        The merged defaults, to pass to `resolve_options`.

    Raises:
        InvalidArgumentError: neither a GenerationConfig nor a dict, an unknown dict key, or a field el-export does
            not implement.
    """
    if generation_config is None:
        return dict(model_defaults)
    config_fields = _HF_FIELDS | _IGNORED | _INERT.keys()
    if isinstance(generation_config, dict):
        unknown = sorted(set(generation_config) - config_fields, key=str)
        if unknown:
            name = str(unknown[0])
            hint = "pass it to generate(seed=...)." if name == "seed" else _did_you_mean(name, _HF_FIELDS)
            _fail(f"generation_config has no field `{name}`; {hint}")
        values = generation_config
    elif callable(getattr(generation_config, "to_diff_dict", None)):
        values = {key: value for key, value in generation_config.to_diff_dict().items() if key in config_fields}
    else:
        _fail(
            "`generation_config` must be a transformers GenerationConfig or a dict of its fields, got "
            f"{type(generation_config).__name__}."
        )
    values = {key: value for key, value in values.items() if value is not None and key not in _IGNORED}
    _check_inert("generation_config", values)
    return {**model_defaults, **values}


def _did_you_mean(name: str, known: frozenset[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f"did you mean `{close[0]}`?" if close else f"known: {', '.join(sorted(known))}."


def _check_inert(source: str, values: dict[str, Any]) -> None:
    for key, value in values.items():
        if key in _INERT and value is not None and value != _INERT[key]:
            _fail(f"{source} sets `{key}={value!r}`, which el-export does not implement; unset it.")


def check_prompt_length(options: GenerationOptions, prompt_length: int) -> None:
    """HF `_validate_generated_length`: the prompt must leave room for at least one new token."""
    if prompt_length >= options.max_length:
        _fail(
            f"the prompt has {prompt_length} tokens but max_length is {options.max_length}; set max_new_tokens instead."
        )
