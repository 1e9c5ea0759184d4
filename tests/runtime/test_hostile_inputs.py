"""Hostile generation arguments and model inputs: each is refused with one line before any graph runs, and
the memory guard bounds what the encoder (or prefill) and a huge max_new_tokens would take."""

import numpy as np
import pytest
import soundfile
import torch

import el_export
from el_export.cli import main
from el_export.contract.cache import encoder_bytes
from el_export.errors import InputError, InvalidArgumentError, ResourceError
from el_export.runtime.base import Backend
from el_export.tolerance import REBATCHED_SCORE_TOLERANCE


@pytest.fixture
def no_graph_runs(monkeypatch):
    """Any graph run fails the test: a refusal must come before the first one."""

    def refuse(self, graph_name, feeds):
        raise AssertionError(f"graph {graph_name} ran")

    monkeypatch.setattr(Backend, "run", refuse)


def _error_line(capsys) -> str:
    """The one stderr line of a refused command; nothing was printed on stdout."""
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert captured.out == "" and len(err) == 1, captured
    return err[0]


@pytest.fixture(scope="module")
def speech_cli_bundle(tmp_path_factory):
    """A tiny Whisper bundle with a tokenizer, so that `el-export generate` reads audio files."""
    from el_export.export import export_model
    from el_export.testing.tiny import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    out = tmp_path_factory.mktemp("speech-cli") / "whisper"
    export_model(tiny_model("whisper", seed=0, vocab_size=len(tokenizer)), out, tokenizer=tokenizer, progress=False)
    return out


# 9: every float HF refuses, NaN and inf everywhere, temperatures that overflow, seeds past torch's range.
BAD_GENERATION_ARGUMENTS = [
    (["--repetition-penalty", "nan"], "`repetition_penalty` must be a finite float > 0"),
    (["--repetition-penalty", "inf"], "`repetition_penalty` must be a finite float > 0"),
    (["--repetition-penalty", "-1"], "`repetition_penalty` must be > 0"),
    (["--do-sample", "--temperature", "nan"], "`temperature` must be a finite float >= 1e-30"),
    (["--temperature", "inf"], "`temperature` must be a finite float >= 1e-30"),
    (["--do-sample", "--temperature", "1e-45"], "`temperature` 1e-45 is below 1e-30"),
    (["--num-beams", "2", "--length-penalty", "nan"], "`length_penalty` must be a finite number"),
    (["--num-beams", "2", "--length-penalty=-inf"], "`length_penalty` must be a finite number"),
    (["--do-sample", "--top-p", "nan"], "`top_p` must be a number in [0, 1]"),
    (["--do-sample", "--seed", str(2**64)], "`seed` must be an integer in [-2**63, 2**64)"),
    (["--do-sample", "--seed", str(-(2**63) - 1)], "`seed` must be an integer in [-2**63, 2**64)"),
    (["--max-new-tokens", str(2**63)], "`max_new_tokens` must be an integer in [1, 2**63)"),
]


@pytest.mark.parametrize(("extra", "fragment"), BAD_GENERATION_ARGUMENTS, ids=[" ".join(a) for a, _ in
                                                                               BAD_GENERATION_ARGUMENTS])  # fmt: skip
def test_bad_generation_arguments_are_one_line_on_the_command_line(cli_bundle, capsys, no_graph_runs, extra, fragment):
    assert main(["generate", str(cli_bundle), "some text", *extra]) == 2
    line = _error_line(capsys)
    assert line.startswith("el-export: error: ") and fragment in line


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"repetition_penalty": 2}, "pass 2.0"),  # HF's processor takes only a float
    ({"do_sample": True, "temperature": float("inf")}, "finite float"),
    ({"do_sample": True, "temperature": 1e-40}, "below 1e-30"),
    ({"num_beams": 2, "length_penalty": float("nan")}, "length_penalty"),
    ({"do_sample": True, "seed": 2**64}, "seed"),
    ({"eos_token_id": 2**70}, "eos_token_id"),
    ({"decoder_start_token_id": 96}, "`decoder_start_token_id` must be a token id in [0, 96)"),
    ({"decoder_input_ids": [[95, 96]]}, "outside the decoder's vocabulary [0, 96)"),
    ({"decoder_input_ids": [[-4]]}, "outside the decoder's vocabulary"),
    ({"decoder_input_ids": [[1, 2], [3, 4]]}, "one row per input"),
    ({"decoder_input_ids": [[1.5]]}, "must be integer [1, length >= 1]"),
    ({"decoder_input_ids": [[]]}, "length >= 1"),
    ({"decoder_input_ids": "ab"}, "rectangular"),
    ({"attention_mask": [[2, 1, 1]]}, "only 0 (padding) and 1"),
    ({"attention_mask": [[0.5, 1, 1]]}, "only 0 (padding) and 1"),
    ({"attention_mask": "xyz"}, "rectangular"),
])  # fmt: skip
def test_bad_arguments_and_inputs_through_the_api(bundles, no_graph_runs, kwargs, fragment):
    generator = el_export.load(bundles("t5", "el"))
    with pytest.raises((InvalidArgumentError, InputError)) as error:
        generator.generate(input_ids=[[5, 6, 7]], max_new_tokens=4, **kwargs)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_seeds_cover_torchs_whole_range(bundles):
    """Negative seeds are torch's, modulo 2**64: -1 and 2**64 - 1 draw the same tokens."""
    generator = el_export.load(bundles("bart", "el"))
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(3))

    def sample(seed):
        return generator.generate(input_ids=ids, do_sample=True, seed=seed, max_new_tokens=8).sequences

    assert torch.equal(sample(-1), sample(2**64 - 1))
    assert sample(-(2**63)).shape[0] == 2


def test_the_smallest_temperature_accepted_samples_greedily(bundles):
    """At 1e-30 the scaled logits stay finite: sampling is argmax, not HF's NaN crash."""
    generator = el_export.load(bundles("bart", "el"))
    ids = torch.randint(3, 90, (3, 6), generator=torch.Generator().manual_seed(4))
    greedy = generator.generate(input_ids=ids, max_new_tokens=8).sequences
    cold = generator.generate(input_ids=ids, do_sample=True, temperature=1e-30, seed=0, max_new_tokens=8).sequences
    assert torch.equal(cold, greedy)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1", "1e-20", "lots"])
def test_memory_limit_must_be_a_finite_positive_size(cli_bundle, capsys, no_graph_runs, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(cli_bundle), "some text", f"--memory-limit={value}"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    expected = f"argument --memory-limit: must be a number of GiB from 2**-30 (one byte) to 2**60, got '{value}'"
    assert captured.out == "" and expected in captured.err.strip().splitlines()[-1]


@pytest.mark.parametrize("limit", [float("nan"), float("inf"), 0, -5, True])
def test_memory_limit_through_the_api(bundles, no_graph_runs, limit):
    generator = el_export.load(bundles("t5", "el"))
    generator.memory_limit = limit
    with pytest.raises(InvalidArgumentError, match="memory_limit must be a positive, finite number of bytes"):
        generator.generate(input_ids=[[5, 6, 7]], max_new_tokens=4)


# 13: the encoder's activations in the guard; a huge max_new_tokens on a model without a position table.
def _ids_with_longest(batch: int, length: int, longest: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 90, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[:, length - 3 :] = 0  # every input but `longest` ends in padding
    mask[longest] = 1
    return ids, mask


def test_a_long_t5_input_is_refused_before_any_graph_runs(bundles, no_graph_runs):
    generator = el_export.load(bundles("t5", "el"))
    ids, mask = _ids_with_longest(3, 400, longest=1, seed=5)
    generator.memory_limit = 2**20  # the decoder state fits (about 60 KiB an input); 400^2 attention does not
    with pytest.raises(ResourceError) as error:
        generator.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5)
    needed = encoder_bytes(generator.manifest.dims, 1, 400)
    assert str(error.value) == (
        f"input 1 is 400 tokens: its encoder needs about {needed / 2**20:.2f} MiB but 1.00 MiB is available "
        "(the memory limit); shorten it or raise --memory-limit"
    )


@pytest.mark.parametrize(("family", "graph", "length"), [("t5", "encoder", 100), ("gpt2", "prefill", 40)])
def test_a_batch_that_fits_only_in_parts_is_encoded_in_parts(bundles, monkeypatch, family, graph, length):
    generator = el_export.load(bundles(family, "el"))
    ids, mask = _ids_with_longest(5, length, longest=2, seed=6)
    kwargs = {"attention_mask": mask, "num_beams": 2, "max_new_tokens": 6}
    whole = generator.generate(input_ids=ids, **kwargs)
    generator.memory_limit = 2 * encoder_bytes(generator.manifest.dims, 1, length) + 1000  # two inputs a call
    calls = []
    original = generator.backend.run
    monkeypatch.setattr(generator.backend, "run", lambda name, feeds: calls.append(name) or original(name, feeds))
    parts = generator.generate(input_ids=ids, **kwargs)
    assert calls.count(graph) == 3  # 2 + 2 + 1 inputs, decoded as one batch
    assert torch.equal(parts.sequences, whole.sequences)
    assert torch.allclose(parts.sequences_scores, whole.sequences_scores, atol=REBATCHED_SCORE_TOLERANCE)


def test_a_huge_max_new_tokens_without_a_position_table_is_refused_with_numbers(bundles, no_graph_runs):
    generator = el_export.load(bundles("t5", "el"))
    assert generator.max_target_positions is None  # nothing but the guard bounds T5's max_length
    with pytest.raises(ResourceError, match=r"one input needs about .* TiB of decoder state but .* is available"):
        generator.generate(input_ids=[[5, 6, 7]], num_beams=4, max_new_tokens=10**12)


def test_an_input_whose_encoder_cannot_fit_on_the_command_line(cli_bundle, capsys, no_graph_runs):
    argv = ["generate", str(cli_bundle), "fox " * 200, "--truncate", "--memory-limit", "0.0002"]  # 210 KiB
    assert main(argv) == 7
    line = _error_line(capsys)
    assert "input 0 is 64 tokens: its encoder needs about" in line and "shorten it or raise --memory-limit" in line


# Audio: NaN samples, files that are not WAV or FLAC, the duration past 30 s.
def _write_case(tmp_path, case: str):
    path = tmp_path / {"raw": "clip.raw", "directory": "clip.wav", "ogg": "clip.ogg"}.get(case, f"{case}.wav")
    if case == "directory":
        path.mkdir()
    elif case == "ogg":
        soundfile.write(path, np.zeros(1600, dtype=np.float32), 16000)
    elif case == "truncated":
        soundfile.write(path, np.zeros(1600, dtype=np.float32), 16000)
        path.write_bytes(path.read_bytes()[:30])  # the header cut before the data chunk
    else:
        path.write_bytes({"raw": b"\0" * 3200, "empty": b"", "text": b"not audio at all"}[case])
    return path


AUDIO_CASES = [
    ("raw", "is headerless RAW audio; give a WAV or FLAC file"),
    ("empty", "Format not recognised.); give a WAV or FLAC file"),
    ("text", "Format not recognised.); give a WAV or FLAC file"),
    ("truncated", "No 'data' chunk marker.); give a WAV or FLAC file"),
    ("directory", "is not a file; give a WAV or FLAC file"),
    ("ogg", "is OGG; give a WAV or FLAC file"),
]


@pytest.mark.parametrize(("case", "fragment"), AUDIO_CASES, ids=[case for case, _ in AUDIO_CASES])
def test_unsupported_audio_files_name_the_file_and_the_formats(bundles, tmp_path, no_graph_runs, case, fragment):
    path = _write_case(tmp_path, case)
    with pytest.raises(InputError) as error:
        el_export.load(bundles("whisper", "el")).generate(audio=[str(path)])
    assert str(path) in str(error.value) and fragment in str(error.value)


@pytest.mark.parametrize(("case", "fragment"), AUDIO_CASES, ids=[case for case, _ in AUDIO_CASES])
def test_unsupported_audio_files_on_the_command_line(speech_cli_bundle, tmp_path, capsys, no_graph_runs, case,
                                                     fragment):  # fmt: skip
    path = _write_case(tmp_path, case)
    assert main(["generate", str(speech_cli_bundle), str(path)]) == 2
    line = _error_line(capsys)
    assert str(path) in line and fragment in line


def test_non_finite_audio_is_refused_naming_the_input(bundles, speech_cli_bundle, tmp_path, capsys, no_graph_runs):
    wave = np.full(1600, 0.1, dtype=np.float32)
    bad = wave.copy()
    bad[[3, 9]] = [np.nan, np.inf]
    generator = el_export.load(bundles("whisper", "el"))
    with pytest.raises(InputError, match=r"^audio 1 has 2 NaN or infinite samples; give finite samples"):
        generator.generate(audio=[wave, bad])
    features = torch.zeros(1, 16, 80)
    features[0, 2, 5] = float("nan")
    with pytest.raises(InputError, match="input_features holds NaN or infinite values"):
        generator.generate(input_features=features)
    path = tmp_path / "nan.wav"
    soundfile.write(path, bad, 16000, subtype="FLOAT")
    assert main(["generate", str(speech_cli_bundle), str(path)]) == 2
    assert f"audio 0 ({path}) has 2 NaN or infinite samples" in _error_line(capsys)


@pytest.mark.parametrize(("samples", "shown"), [(1440001, "14400.01"), (14400001, "14400.001")])
def test_audio_past_4_hours_shows_it_is_past(bundles, no_graph_runs, samples, shown):
    """Checked before resampling (at 100 and 1000 Hz here): a recording past the 4 hours el-export reads."""
    rate = 100 if samples < 10**7 else 1000
    with pytest.raises(InputError, match=rf"^audio 0 is {shown} s; el-export transcribes recordings of up to 14400 s"):
        el_export.load(bundles("whisper", "el")).generate(audio=[np.zeros(samples, dtype=np.float32)],
                                                          sampling_rate=rate)  # fmt: skip


def test_audio_past_30_s_needs_timestamps(bundles, no_graph_runs):
    """Past 30 s, HF transcribes long-form, which predicts timestamps: a model without timestamp tokens cannot."""
    generator = el_export.load(bundles("whisper", "el"))
    wave = np.zeros(30 * 16000 + 1, dtype=np.float32)
    with pytest.raises(InvalidArgumentError, match="^audio longer than 30 s is transcribed long-form"):
        generator.generate(audio=[wave])
    with pytest.raises(InvalidArgumentError, match="^the model has no timestamp tokens"):
        generator.generate(audio=[wave], return_timestamps=True)


# inspect: every integer option in range; the source within the model's positions.
@pytest.mark.parametrize(("family", "extra", "fragment"), [
    ("bart", ["--source-len", "-5"], "--source-len must be from 1 to 64 (the model has 64 positions), got -5"),
    ("bart", ["--source-len", "0"], "--source-len must be from 1 to 64"),
    ("bart", ["--source-len", "65"], "--source-len must be from 1 to 64 (the model has 64 positions), got 65"),
    ("gpt2", ["--source-len", "65"], "--source-len must be from 1 to 64"),
    ("t5", ["--source-len", "0"], "--source-len must be from 1 to 9223372036854775807"),
    ("t5", ["--source-len", str(2**63)], "--source-len must be from 1 to 9223372036854775807"),
    ("bart", ["--batch-size", "0"], "--batch-size must be from 1"),
    ("bart", ["--num-beams", "-2"], "--num-beams must be from 1"),
    ("bart", ["--max-new-tokens", "0"], "--max-new-tokens must be from 1"),
    ("t5", ["--batch-size", str(10**400)], "--batch-size must be from 1 to 9223372036854775807"),
    ("whisper", ["--source-len", "10"], "a speech model's source is 30 s of audio (40 frames); drop --source-len"),
])  # fmt: skip
def test_inspect_refuses_out_of_range_integers(bundles, capsys, family, extra, fragment):
    assert main(["inspect", str(bundles(family, "el")), *extra]) == 2
    assert fragment in _error_line(capsys)


def test_inspect_takes_any_length_without_a_position_table(bundles, capsys):
    import json

    assert main(["inspect", str(bundles("t5", "el")), "--source-len", "100000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["workload"]["source_len"] == 100000
    assert main(["inspect", str(bundles("bart", "el")), "--source-len", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["workload"]["source_len"] == 64
