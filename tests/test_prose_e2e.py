"""End to end on a long document of natural prose: the real CLI, the embedded model, the default preset.

A user sends a ~4K-token document of prose (the long-document benchmark's corpus) with one needle sentence in it,
far outside the local window, and asks for the needle's number, as `!!file DOC QUESTION` sends it: the same
message the benchmark's `single` task builds. The default InfLLM preset answers it (a conversation this short has
its 512-token window); StreamingLLM (its preset: 32 sinks and a 128-token window) has dropped the needle and cannot.
Greedy decoding keeps both deterministic.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from inf_llm.bench.prose_tasks import INTRO, build_prose_prompt
from inf_llm.config.files import load_config
from inf_llm.config.presets import preset_path

REPO = Path(__file__).resolve().parent.parent
# A case of the benchmark's `single` task (task, length, depth, seed) that the default preset answers.
CASE = ("single", 4096, 0.1, 1)


def run_chat(tmp_path: Path, document: Path, question: str, *config: str) -> str:
    commands = f"!!file {document} {question}\n"
    done = subprocess.run([sys.executable, "-m", "inf_llm.chat", "--style", "simple", "--temperature", "0",
                           "--max-new-tokens", "32", *config], input=commands, capture_output=True, text=True,
                          cwd=REPO, timeout=900, env={**os.environ, "INF_LLM_DATA_DIR": str(tmp_path / "data")})
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_a_needle_in_prose_beyond_the_window_is_answered_by_inf_llm_and_lost_by_stream_llm(embedded_model, tmp_path):
    tokenizer = embedded_model[1]
    prompt = build_prose_prompt(tokenizer, *CASE)
    text = tokenizer.decode(prompt.ids)
    document = text[text.index(INTRO) : text.index(prompt.question)].rstrip()
    path = tmp_path / "document.txt"
    path.write_text(document, encoding="utf-8")
    needle_start = prompt.needles[prompt.target][0]
    window = load_config(preset_path("smollm2-inf-llm")).config.short_config().local_window
    assert len(prompt.ids) < 12288 and window == 512  # the preset reads it with its short conversation's window
    assert len(prompt.ids) - needle_start > 5 * window  # far outside it

    inf_llm = run_chat(tmp_path, path, prompt.question)
    assert prompt.answers[0] in inf_llm, inf_llm
    stream = run_chat(tmp_path, path, prompt.question, "--inf-llm-config-path", "smollm2-stream-llm")
    assert "ASSISTANT:" in stream and prompt.answers[0] not in stream, stream
