"""The command line as scripts use it: `python -m inf_llm.chat --style simple` with pipes, sessions across runs,
and start-up errors. A tiny random checkpoint (the embedded tokenizer, random weights) keeps each run short.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_chat_conversation import VOCAB, tiny_config
from tests.tiny_models import tiny_model
from tests.test_sessions import _tree  # a session folder's files and bytes

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, embedded_model):
    folder = tmp_path_factory.mktemp("tiny-checkpoint")
    tiny_model("llama", vocab_size=VOCAB).save_pretrained(folder)
    embedded_model[1].save_pretrained(folder)
    config = folder / "tiny.yaml"
    tiny_config(topk_blocks=2, device_cache_blocks=4).to_yaml(config)
    return folder, config


def chat(checkpoint, data_dir, stdin, *extra, config=None):
    folder, default_config = checkpoint
    env = {**os.environ, "INF_LLM_DATA_DIR": str(data_dir), "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "inf_llm.chat", "--model-path", str(folder), "--inf-llm-config-path",
            str(config or default_config), "--temperature", "0", "--max-new-tokens", "4", "--device", "cpu", *extra]
    return subprocess.run(args, input=stdin, capture_output=True, text=True, env=env, cwd=str(REPO), timeout=300)


def test_pipes_sessions_and_refusal(checkpoint, tmp_path):
    first = chat(checkpoint, tmp_path, "hello\n\nsecond line\n!!stats\n", "--session", "piped")
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("ASSISTANT: ") == 2  # one reply per message; the empty line was skipped
    assert "tokens in memory" in first.stdout
    assert "\x1b" not in first.stdout + first.stderr  # no ANSI codes through a pipe
    session = tmp_path / "sessions" / "piped.session"
    saved = _tree(session)

    again = chat(checkpoint, tmp_path, "!!stats\n", "--session", "piped")
    assert again.returncode == 0, again.stderr
    assert "resumed session 'piped': 4 messages" in again.stderr
    assert [line.split()[-1] for line in again.stdout.splitlines() if "tokens read since start-up" in line] == ["0"]
    assert _tree(session) == saved  # !!stats changes nothing, so nothing was written

    other = tmp_path / "other.yaml"
    tiny_config(local_window=64, topk_blocks=2, device_cache_blocks=4).to_yaml(other)
    refused = chat(checkpoint, tmp_path, "hello\n", "--session", "piped", config=other)
    assert refused.returncode == 2
    assert "config.local_window: session has 32, now 64" in refused.stderr
    assert "ASSISTANT" not in refused.stdout
    assert _tree(session) == saved


def test_start_up_errors_name_the_problem(checkpoint, tmp_path, monkeypatch, capsys):
    from chat.cli import main

    monkeypatch.setenv("INF_LLM_DATA_DIR", str(tmp_path))
    folder, config = checkpoint
    common = ["--model-path", str(folder), "--inf-llm-config-path", str(config), "--style", "simple"]
    assert main([*common, "--conv-template", "vicuna_v1"]) == 2
    assert "unknown fastchat conversation template 'vicuna_v1'; did you mean vicuna_v1.1" in capsys.readouterr().err
    assert main([*common, "--session", "../x"]) == 2
    assert "invalid session name" in capsys.readouterr().err
    assert main([*common, "--temperature", "-1"]) == 2
    assert "temperature must be >= 0" in capsys.readouterr().err
    assert main(["--model-path", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--inf-llm-config-path", "no-such-preset"]) == 2
    assert "no preset named 'no-such-preset'" in capsys.readouterr().err


def test_help_names_every_flag():
    from chat.cli import build_parser

    out = build_parser().format_help()
    for flag in ("--model-path", "--inf-llm-config-path", "--conv-template", "--conv-system-msg", "--temperature",
                 "--top-p", "--top-k", "--repetition-penalty", "--max-new-tokens", "--style", "--multiline",
                 "--session", "--device", "--debug"):
        assert flag in out
