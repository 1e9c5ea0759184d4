"""`el-export compare` end to end on a bundle of every family, and the verdicts it must not give."""

import json
import re

import numpy as np
import pytest
import torch

import el_export
from el_export.cli import main
from el_export.contract.files import read_manifest
from el_export.evaluation.agreement import TokenAgreement, token_agreement
from el_export.evaluation.compare import AGREE, DIFFER, EXIT_CODES, Check, Report, _generation_check, compare_bundle
from el_export.export import export_model
from el_export.testing.tiny import tiny_model, write_tiny_checkpoint

# Small but real: a padded batch of 2, greedy and 2 beams (2 sequences per input), 16 new tokens (the default:
# the tiny T5 v1.1's logits peak near 300, and its beam scores over 5 tokens sit 2e-4 from HF's, past 1e-4).
FAST = ["--json", "--batch-size", "2", "--num-beams", "2"]


@pytest.fixture(scope="module")
def references(tmp_path_factory, hf_models):
    """family -> the tiny seed-0 model `bundles` exports, saved as a checkpoint directory (no tokenizer)."""
    root, cache = tmp_path_factory.mktemp("references"), {}

    def get(family: str):
        if family not in cache:
            cache[family] = root / family
            hf_models(family).save_pretrained(cache[family])
        return cache[family]

    return get


def _compare(capsys, *args) -> tuple[int, dict]:
    code = main(["compare", *map(str, args)])
    return code, json.loads(capsys.readouterr().out)


def _error_line(capsys) -> str:
    """The one error line (warnings such as "no tokenizer files" may precede it); nothing on stdout."""
    captured = capsys.readouterr()
    err = [line for line in captured.err.strip().splitlines() if not line.startswith("el-export: warning: ")]
    assert len(err) == 1 and err[0].startswith("el-export: error: ") and not captured.out, captured
    return err[0]


@pytest.mark.parametrize("family", ["bart", "mbart", "marian", "pegasus", "t5", "t5-v1_1", "gpt2"])
def test_every_text_family_passes_without_a_tokenizer(family, bundles, references, capsys):
    """Seeded random ids; GPT-2 (decoder-only) used to crash here on its encoder_vocab_size of 0."""
    code, report = _compare(capsys, bundles(family, "el"), "--reference", references(family), *FAST)
    assert (code, report["verdict"], report["exit_code"]) == (0, "PASS", 0), report["summary"]
    graphs, generation = report["checks"][:2], report["checks"][2:]
    assert [c["name"].split()[0] for c in graphs] == ["graph", "graph"]
    assert all(c["max_abs_error"] >= 0 and set(c["tolerance"]) == {"atol", "rtol"} for c in graphs)
    assert [(c["verdict"], c["sequences"], c["sequences_differing"]) for c in generation] == [
        ("PASS", 2, 0),
        ("PASS", 4, 0),
    ]
    assert generation[1]["score_error"] <= generation[1]["tolerance"]["score"] == 1e-4
    assert report["summary"] == (
        "PASS: graphs within float32 tolerance; tokens equal HF generate's on all 6 sequences, scores within 1e-04"
    )


def test_bart_with_a_tokenizer_passes_and_prints_a_table(cli_bundle, checkpoint, capsys):
    assert main(["compare", str(cli_bundle), "--reference", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "generate beam 4 (tokens vs HF generate)" in out and "batch 3, 6 sequences of up to 17 tokens" in out
    assert out.rstrip().endswith("tokens equal HF generate's on all 9 sequences, scores within 1e-04")


def test_gpt2_with_a_tokenizer_passes(tmp_path, capsys):
    checkpoint = write_tiny_checkpoint(tmp_path / "gpt2", "gpt2")
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "bundle")]) == 0
    capsys.readouterr()
    code, report = _compare(capsys, tmp_path / "bundle", "--reference", checkpoint, *FAST)
    assert (code, report["verdict"]) == (0, "PASS"), report["summary"]


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    """A tiny seeded Whisper checkpoint whose feature extractor fits its 80 frames (1 s at hop 200), its el bundle
    exported through the CLI, and three short synthetic clips."""
    import soundfile
    from transformers import WhisperFeatureExtractor

    root = tmp_path_factory.mktemp("whisper")
    tiny_model("whisper", seed=0).save_pretrained(root / "checkpoint")
    WhisperFeatureExtractor(feature_size=16, chunk_length=1, hop_length=200).save_pretrained(root / "checkpoint")
    assert main(["export", str(root / "checkpoint"), "--out", str(root / "bundle")]) == 0
    rng, clips = np.random.default_rng(0), []
    for i, seconds in enumerate((0.3, 0.6, 0.9)):
        t = np.arange(int(16000 * seconds)) / 16000
        wave = 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.05 * rng.standard_normal(t.size)
        clips.append(root / f"clip{i}.wav")
        soundfile.write(clips[-1], wave.astype(np.float32), 16000)
    return root / "checkpoint", root / "bundle", clips


def test_whisper_is_compared_on_audio_quietly(whisper, capfd):
    """Audio in on both sides; HF's "Both max_new_tokens and max_length" note (twice per run) stays silent."""
    from transformers.utils import logging as hf_logging

    checkpoint, bundle, clips = whisper
    capfd.readouterr()
    level = hf_logging.get_verbosity()
    code = main(["compare", str(bundle), "--reference", str(checkpoint), "--audio", *map(str, clips),
                 "--num-beams", "3", "--max-new-tokens", "6", "--json"])  # fmt: skip
    out, err = capfd.readouterr()
    report = json.loads(out)
    assert (code, report["verdict"]) == (0, "PASS"), report["summary"]
    assert "max_length" not in err and hf_logging.get_verbosity() == level
    features = report["checks"][2]
    assert features["name"].startswith("features") and features["verdict"] == "PASS"
    assert features["max_abs_error"] <= features["tolerance"]["atol"]["input_features"]
    assert [(c["name"], c["sequences"], c["sequences_differing"]) for c in report["checks"][3:]] == [
        ("generate greedy (tokens vs HF generate)", 3, 0),
        ("generate beam 3 (tokens vs HF generate)", 3, 0),
    ]


def test_whisper_features_unlike_the_checkpoints_fail(whisper, tmp_path, capsys):
    """A checkpoint whose feature extractor is not the one the bundle was exported with (another FFT size)."""
    import shutil

    from transformers import WhisperFeatureExtractor

    checkpoint, bundle, clips = whisper
    other = shutil.copytree(checkpoint, tmp_path / "other-extractor")
    WhisperFeatureExtractor(feature_size=16, chunk_length=1, hop_length=200, n_fft=256).save_pretrained(other)
    code, report = _compare(capsys, bundle, "--reference", other, "--audio", *clips, "--num-beams", "1",
                            "--max-new-tokens", "3", "--json")  # fmt: skip
    features = next(c for c in report["checks"] if c["name"].startswith("features"))
    assert (code, report["verdict"], features["verdict"]) == (1, "FAIL", "FAIL")
    assert features["max_abs_error"] > features["tolerance"]["atol"]["input_features"]
    assert "features (bundle log-mel vs the checkpoint's feature extractor)" in report["summary"]


def test_whisper_limits_are_the_encoder_frames_and_the_decoder_positions(whisper, bundles, tmp_path):
    from el_export.errors import InvalidArgumentError

    generator = el_export.load(whisper[1])
    assert (generator.max_source_positions, generator.max_target_positions) == (40, 64)
    with pytest.raises(InvalidArgumentError, match="past the decoder's 64 positions"):
        generator.generate(audio=[str(whisper[2][0])], max_new_tokens=65)
    bart = el_export.load(bundles("bart", "el"))
    assert (bart.max_source_positions, bart.max_target_positions) == (64, 64)


def test_source_vocabulary_has_one_rule(bundles):
    from el_export.contract.files import read_manifest

    gpt2, marian = read_manifest(bundles("gpt2", "el")), read_manifest(bundles("marian", "el"))
    assert gpt2.dims["encoder_vocab_size"] == 0 and gpt2.source_vocab_size == gpt2.dims["vocab_size"] == 96
    assert marian.source_vocab_size == marian.dims["encoder_vocab_size"] == 96


def test_whisper_default_clips_are_too_long_for_a_1_s_model(whisper, capsys):
    """The shipped clips are the default; a model that hears 1 s refuses them before any check runs."""
    checkpoint, bundle, _ = whisper
    assert main(["compare", str(bundle), "--reference", str(checkpoint)]) == 2
    assert "the model transcribes up to 1 s at once: split it" in _error_line(capsys)


def test_whisper_reference_without_a_feature_extractor(whisper, tmp_path, capsys):
    tiny_model("whisper", seed=0).save_pretrained(tmp_path / "no-extractor")
    assert main(["compare", str(whisper[1]), "--reference", str(tmp_path / "no-extractor")]) == 2
    assert "has no feature extractor (preprocessor_config.json)" in _error_line(capsys)


def test_audio_is_refused_for_a_text_bundle_before_the_reference_loads(bundles, tmp_path, capsys):
    args = ["compare", str(bundles("bart", "el")), "--reference", str(tmp_path / "absent"), "--audio", "a.wav"]
    assert main(args) == 2
    assert "--audio is for speech bundles" in _error_line(capsys)


def test_a_reference_of_another_shape_is_refused(bundles, tmp_path, capsys):
    tiny_model("bart", seed=0, vocab_size=120).save_pretrained(tmp_path / "bart-120")
    assert main(["compare", str(bundles("bart", "el")), "--reference", str(tmp_path / "bart-120")]) == 2
    assert "the bundle's vocab_size is 96 but" in _error_line(capsys)


def test_a_wrong_bundle_fails_with_exit_1_on_a_narrow_terminal(bundles, tmp_path, capsys, monkeypatch):
    """The seed-0 bundle against a seed-1 checkpoint of the same shape: every check fails, and the table wraps
    its details on a 70-column terminal instead of cutting them."""
    import sys

    tiny_model("bart", seed=1).save_pretrained(tmp_path / "seed-1")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("COLUMNS", "70")
    code = main(["compare", str(bundles("bart", "el")), "--reference", str(tmp_path / "seed-1"),
                 "--num-beams", "2", "--max-new-tokens", "4"])  # fmt: skip
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    assert code == 1 == EXIT_CODES["FAIL"]
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 70
    assert out.count("FAIL") >= 4 and "FAIL: graph encoder (onnxruntime vs torch), graph decoder_step" in out
    details = " ".join(" ".join(line.split("│")[3] for line in out.splitlines() if line.startswith("│")).split())
    assert "batch 3, 3 sequences of up to 5 tokens: tokens differ on 3 of 3, first at step 0 (row 0:" in details


@pytest.fixture(scope="module")
def reduced(tmp_path_factory, hf_models):
    """A float16 and an int8 bundle of the tiny BART."""
    root = tmp_path_factory.mktemp("reduced")
    export_model(hf_models("bart"), root / "fp16", dtype="float16", progress=False)
    export_model(hf_models("bart"), root / "int8", quantize="int8", progress=False)
    return root


@pytest.mark.parametrize("kind", ["fp16", "int8"])
def test_reduced_precision_tokens_that_differ_are_never_a_pass(kind, reduced, references, capsys):
    """The tiny BART's beams part from HF's in float16 and in int8: DIFFER with exit 8, and the figures: each
    generation check's token agreement (1 exactly when its sequences agree), and the int8 recipe's name."""
    code, report = _compare(capsys, reduced / kind, "--reference", references("bart"), "--json")
    precision = {"fp16": "float16", "int8": "int8"}[kind]
    assert (code, report["verdict"], report["precision"]) == (8, DIFFER, precision), report["summary"]
    graphs, generation = report["checks"][:2], report["checks"][2:]
    assert all(c["verdict"] == "PASS" for c in graphs)
    assert all(c["verdict"] in ("AGREE", "DIFFER") for c in generation)
    assert [c["tokens_compared"] for c in generation] == [3 * 16, 6 * 16]  # every sequence runs 16 new tokens
    assert all((c["token_agreement"] == 1) == (c["verdict"] == AGREE) for c in generation)
    assert all(c["transcripts"] is None and c["word_error_rate"] is None for c in generation)  # text: no WER
    differing = sum(c["sequences_differing"] for c in generation)
    step = min(c["first_differing_step"] for c in generation if c["sequences_differing"])
    equal = sum(c["token_agreement"] * c["tokens_compared"] for c in generation) / (9 * 16)
    assert 0 < differing <= 9 and 0 <= step < 16 and 0 < equal < 1
    recipe = read_manifest(reduced / kind).quantization.get("recipe", {}).get("name")
    assert report["recipe"] == recipe and (recipe is None) == (kind == "fp16")
    graphs_claim = f"int8 (recipe {recipe}) graphs well-formed" if kind == "int8" else "graphs within float16 tolerance"
    assert report["summary"] == (
        f"DIFFER: {graphs_claim}; tokens differ on {differing} of 9 sequences, first at step {step}, "
        f"{equal:.1%} of tokens equal"
    )


def test_token_agreement_figures():
    """Rows compared whole up to their trailing pads (a longer or missing sequence differs); steps count
    generated tokens only; tokens are compared at equal positions past the prompt, a token one side lacks unequal."""
    ours = torch.tensor([[2, 5, 6, 7], [2, 5, 6, 8], [2, 9, 9, 9]])
    hf = torch.tensor([[2, 5, 6, 7], [2, 5, 6, 7], [2, 9, 9, 1]])
    assert token_agreement(ours, hf, prompt_length=1) == TokenAgreement(3, 2, 2, tokens_compared=9, tokens_equal=7)
    assert token_agreement(ours, hf, prompt_length=1).rate == 7 / 9
    assert token_agreement(ours, ours, prompt_length=1) == TokenAgreement(3, 0, None, 9, 9)
    assert token_agreement(ours[:, :3], ours, prompt_length=1) == TokenAgreement(3, 3, 2, 9, 6)
    assert token_agreement(ours[:2], ours, prompt_length=1) == TokenAgreement(3, 1, 0, 9, 6)
    # one batch ran 2 steps longer: its finished rows carry 2 more pads (here 0), yet are the same tokens
    longer = torch.tensor([[2, 5, 6, 7, 0, 0], [2, 5, 6, 8, 0, 0], [2, 9, 9, 9, 4, 0]])
    assert token_agreement(longer, ours, prompt_length=1, pad=0) == TokenAgreement(3, 1, 3, 10, 9)
    assert token_agreement(longer, ours, prompt_length=1) == TokenAgreement(3, 3, 3, 15, 9)


WORDS = {5: "The", 6: "cat", 7: "sat.", 8: "ran.", 9: "no", 1: "No"}


def _fake_decode(ids: torch.Tensor) -> list[str]:
    """A tokenizer of one word per id (2, the start token, writes nothing)."""
    return [" ".join(WORDS[i] for i in row if i in WORDS) for row in ids.tolist()]


def _check(ours: torch.Tensor, hf: torch.Tensor, precision: str, decode=_fake_decode) -> Check:
    """A generation check of two greedy outputs of 3 new tokens after a 1-token prompt."""
    from types import SimpleNamespace

    from transformers.generation.utils import GenerateEncoderDecoderOutput

    reference = GenerateEncoderDecoderOutput(sequences=hf, scores=(None,) * (hf.shape[1] - 1))
    return _generation_check("generate greedy", SimpleNamespace(sequences=ours, sequences_scores=None), reference,
                             "batch 3", precision, pad=None, decode=decode)  # fmt: skip


def test_a_check_whose_tokens_differ_is_differ_with_the_figures():
    """Hand-counted: 2 of 3 sequences differ from step 2; 7 of 9 tokens equal; one transcript identical; HF's
    9 words, 2 of them substituted ("ran." for "sat.", "no" for "No": case counts), WER 2/9."""
    ours = torch.tensor([[2, 5, 6, 7], [2, 5, 6, 8], [2, 9, 9, 9]])
    hf = torch.tensor([[2, 5, 6, 7], [2, 5, 6, 7], [2, 9, 9, 1]])
    check = _check(ours, hf, "int8")
    figures = ("verdict", "sequences", "sequences_differing", "first_differing_step", "token_agreement",
               "tokens_compared", "transcripts", "transcripts_identical", "transcripts_differing", "word_error_rate",
               "reference_words")  # fmt: skip
    assert [check.to_json()[f] for f in figures] == [DIFFER, 3, 2, 2, 7 / 9, 9, 3, 1, 2, 2 / 9, 9]
    assert check.detail == (
        "int8: batch 3, 3 sequences of up to 4 tokens: tokens differ on 2 of 3, first at step 2 (row 1: "
        "[2, 5, 6, 8] vs HF [2, 5, 6, 7]); 77.8% of 9 tokens equal; transcripts identical 1/3, WER 22.2% vs HF float32"
    )
    report = Report("b", "r", "int8", [check], recipe="default")
    assert (report.verdict, report.exit_code, report.to_json()["recipe"]) == (DIFFER, 8, "default")
    assert report.summary() == (
        "DIFFER: int8 (recipe default) graphs well-formed; tokens differ on 2 of 3 sequences, first at step 2, "
        "77.8% of tokens equal; transcripts identical 1/3, WER 22.2% vs HF float32"
    )
    assert _check(ours, hf, "float32").verdict == "FAIL"  # the same tokens in float32: a failure, not a figure
    same = _check(hf, hf, "float16")
    assert (same.verdict, same.token_agreement, same.transcripts_identical, same.word_error_rate) == (AGREE, 1, 3, 0)
    assert same.detail.endswith("tokens equal; transcripts identical 3/3, WER 0.0% vs HF float32")
    assert _check(ours, hf, "int8", decode=None).transcripts is None  # no tokenizer: tokens only


def test_the_summary_adds_the_checks_figures_up():
    """Token agreement and WER over all generation checks together (weighted by tokens and HF's words), not the
    mean of the checks' rates; sequences and transcripts summed."""
    beam = Check("generate beam", DIFFER, "", sequences=6, sequences_differing=2, first_differing_step=7,
                 token_agreement=0.5, tokens_compared=30, transcripts=6, transcripts_identical=4,
                 word_error_rate=0.25, reference_words=8)  # fmt: skip
    greedy = Check("generate greedy", AGREE, "", sequences=3, sequences_differing=0, token_agreement=1.0,
                   tokens_compared=10, transcripts=3, transcripts_identical=3, word_error_rate=0.0,
                   reference_words=2)  # fmt: skip
    report = Report("b", "r", "float16", [beam, greedy])
    assert (report.verdict, report.exit_code) == (DIFFER, 8)
    assert report.summary() == (
        "DIFFER: graphs within float16 tolerance; tokens differ on 2 of 9 sequences, first at step 7, "
        "62.5% of tokens equal; transcripts identical 7/9, WER 20.0% vs HF float32"
    )
    agree = Report("b", "r", "int8", [greedy], recipe="tensor")
    assert agree.exit_code == 0 and agree.summary() == (
        "AGREE: int8 (recipe tensor) graphs well-formed; tokens equal HF generate's on all 3 sequences; "
        "transcripts identical 3/3, WER 0.0% vs HF float32"
    )


def test_real_whisper_int8_reports_transcript_agreement_on_the_shipped_clips(tiny_en, tmp_path):
    """The real tiny.en in int8 (the default recipe) against HF in float32 on el_export/clips: figures that add
    up, and a verdict that is never PASS."""
    from el_export.evaluation.demo import CLIPS
    from el_export.export import load_feature_extractor

    hf, tokenizer, _ = tiny_en
    checkpoint = hf.name_or_path  # the directory the fixture imported tiny.en into
    export_model(hf, tmp_path / "int8", quantize="int8", tokenizer=tokenizer,
                 feature_extractor=load_feature_extractor(checkpoint), progress=False)  # fmt: skip
    report = compare_bundle(tmp_path / "int8", checkpoint)
    recipe = read_manifest(tmp_path / "int8").quantization["recipe"]["name"]
    assert (report.precision, report.recipe) == ("int8", recipe)
    assert report.verdict in (AGREE, DIFFER), report.summary()
    generation = [c for c in report.checks if c.sequences is not None]
    assert [c.transcripts for c in generation] == [len(list(CLIPS.iterdir()))] * 2  # greedy and beam 4
    for c in generation:
        assert c.transcripts_identical == c.transcripts - c.transcripts_differing, c.detail
        assert 0 <= c.word_error_rate and c.reference_words > 0, c.detail
        # (a <= b on bools: a implies b) a changed transcript means changed tokens, which means tokens unequal
        assert (c.transcripts_identical < c.transcripts) <= (c.sequences_differing > 0) <= (c.token_agreement < 1)
        assert c.verdict == (DIFFER if c.sequences_differing else AGREE)
    identical, transcripts = sum(c.transcripts_identical for c in generation), sum(c.transcripts for c in generation)
    wer = sum(c.word_error_rate * c.reference_words for c in generation) / sum(c.reference_words for c in generation)
    assert f"; transcripts identical {identical}/{transcripts}, WER {wer:.1%} vs HF float32" in report.summary()


def test_help_documents_the_verdicts_and_exit_status(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0 and "--audio FILE" in text
    assert "1 a check failed (FAIL" in text and "8 reduced precision, graphs within tolerance, but tokens" in text
