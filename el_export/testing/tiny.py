"""Seeded tiny random-init checkpoints: the embedded default of the demo and the models of the tests.

Random weights, so their text is gibberish; what they prove is that the exported graphs and the
runtime give exactly the tokens of HF `generate` on the same weights. The weights are drawn with a
large init std so that next-token logits are well separated (no near-ties for parity to trip on).
"""

from pathlib import Path

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Exported graphs must give the same tokens as the original model.",
    "Memory efficient attention keeps one copy of the encoder output per input.",
    "Beam search keeps several hypotheses and reorders their caches at every step.",
    "Speech recognition, translation and summarization all decode one token at a time.",
]

_BART_LIKE = dict(
    d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, init_std=0.5,
    bos_token_id=0, pad_token_id=1, eos_token_id=2,
)  # fmt: skip
_T5_LIKE = dict(
    d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, initializer_factor=4.0,
    relative_attention_num_buckets=8, relative_attention_max_distance=20,
    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)  # fmt: skip

# label -> HF config class and its tiny settings; every registered family has at least one label.
_TINY = {
    "bart": ("BartConfig", {**_BART_LIKE, "decoder_start_token_id": 2}),
    "mbart": ("MBartConfig", _BART_LIKE),
    "marian": ("MarianConfig", {**_BART_LIKE, "decoder_start_token_id": 1, "forced_eos_token_id": 2}),
    "pegasus": ("PegasusConfig", {**_BART_LIKE, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}),
    "t5": ("T5Config", {**_T5_LIKE, "feed_forward_proj": "relu"}),  # v1.0: ReLU, tied, output scaled
    "t5-v1_1": ("T5Config", {**_T5_LIKE, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}),
    "mt5": ("MT5Config", {**_T5_LIKE, "feed_forward_proj": "gated-gelu"}),
}
FAMILIES = tuple(_TINY)  # encoder-decoders
# Decoder-only: GPT-2, eos 1 doubling as pad (as GPT-2 checkpoints have no pad token).
_GPT2 = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.5, bos_token_id=0, eos_token_id=1)
DECODER_ONLY = ("gpt2",)
# Whisper: 16 mel bins, 40 encoder frames; <|notimestamps|> is the last id, so no timestamp tokens exist
# (HF's short-form Whisper would otherwise re-decode after a pair of them).
_WHISPER = dict(
    d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=40, max_target_positions=64,
    init_std=0.5, bos_token_id=91, eos_token_id=91, pad_token_id=91, decoder_start_token_id=90,
)  # fmt: skip
_WHISPER_GENERATION = dict(
    max_length=64, bos_token_id=91, eos_token_id=91, pad_token_id=91, decoder_start_token_id=90,
    no_timestamps_token_id=95, suppress_tokens=[3, 4], begin_suppress_tokens=[5, 91], return_timestamps=False,
    alignment_heads=[[1, 2], [0, 1], [1, 0]],  # out of layer order, as the export must keep them
)  # fmt: skip
SPEECH = ("whisper", "whisper-multilingual")


def tiny_config(family: str, vocab_size: int = 96, **overrides):
    import transformers

    if family == "gpt2":
        return transformers.GPT2Config(**{**_GPT2, "vocab_size": vocab_size, **overrides})
    if family in SPEECH:
        return transformers.WhisperConfig(**{**_WHISPER, "vocab_size": vocab_size, **overrides})
    class_name, settings = _TINY[family]
    settings = {**settings, "vocab_size": vocab_size}
    if class_name == "MarianConfig":
        settings["decoder_vocab_size"] = vocab_size
    return getattr(transformers, class_name)(**{**settings, **overrides})


def tiny_model(family: str, seed: int = 0, vocab_size: int = 96, **overrides):
    """A seeded random-init HF seq2seq model of `family`, in eval mode."""
    import transformers

    from el_export.families import family_for

    config = tiny_config(family, vocab_size, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, family_for(config).auto_model).from_config(config).eval()
    if family in SPEECH:
        from transformers import GenerationConfig

        settings = dict(_WHISPER_GENERATION, is_multilingual=family == "whisper-multilingual")
        if family == "whisper-multilingual":  # two languages, two tasks; the language is detected
            settings.update(lang_to_id={"<|en|>": 85, "<|fr|>": 86}, task_to_id={"transcribe": 87, "translate": 88},
                            forced_decoder_ids=[[1, None], [2, 87]])  # fmt: skip
        model.generation_config = GenerationConfig(**settings)
    if hasattr(model, "final_logits_bias"):
        with torch.no_grad():  # a non-zero final_logits_bias, so the export must carry it
            model.final_logits_bias.normal_(0.0, 0.5)
    return model


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on CORPUS with BART's special tokens at BART's ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def write_tiny_checkpoint(directory: str | Path, family: str = "bart", seed: int = 0) -> Path:
    """Save a seeded tiny model of `family` with a trained tokenizer as an HF checkpoint directory."""
    directory = Path(directory)
    tokenizer = tiny_tokenizer()
    model = tiny_model(family, seed=seed, vocab_size=len(tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
