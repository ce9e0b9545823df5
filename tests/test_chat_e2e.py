"""End to end: the real CLI (`--style rich`) in a pseudo-terminal with the embedded model.

Turn 1 states a fact, turn 2 is a document longer than the model's native 8K window, pasted with bracketed
paste (with newlines, without --multiline), turn 3 asks about the fact. Then the program is restarted on the
same session and asked again: it must answer without re-reading, i.e. the turn reads only the new question.
Greedy decoding; the pass key is the fact the embedded model recalls reliably under the default preset.
"""

import os
import re
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

REPO = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]")
FACT = "The pass key is 71432. Remember it. 71432 is the pass key."
QUESTION = "What is the pass key?"
ANSWER = "71432"
CPR = "\x1b\\[6n"
TOOLBAR = r"tokens ([\d,]+) \| window [\d,]+ \| blocks [\d,]+/layer \(device [\d,]+ / host [\d,]+\) \| hit "
TURN_END = r"read ([\d,]+) tokens, wrote"
PARAGRAPH = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 12


def spawn(data_dir: Path):
    env = {**os.environ, "INF_LLM_DATA_DIR": str(data_dir), "PYTHONPATH": str(REPO), "TERM": "xterm-256color",
           "COLUMNS": "160", "LINES": "48"}
    args = ["-m", "inf_llm.chat", "--style", "rich", "--temperature", "0", "--max-new-tokens", "12",
            "--session", "e2e"]
    child = pexpect.spawn(sys.executable, args, cwd=str(REPO), env=env, encoding="utf-8", timeout=600,
                          dimensions=(48, 160), codec_errors="replace")
    child.startup = expect(child, "USER:", timeout=180)
    return child


def expect(child, pattern, timeout=-1) -> str:
    """child.expect, answering prompt-toolkit's cursor position requests as a terminal would (it shows the
    bottom toolbar only once it knows where the cursor is). Returns all the text before the match, cleaned."""
    seen = []
    while True:
        index = child.expect([pattern, CPR], timeout=timeout)
        seen.append(child.before if isinstance(child.before, str) else "")
        if index == 0:
            return clean("".join(seen))
        child.send("\x1b[20;1R")


def clean(text: str) -> str:
    return ANSI.sub("", text)


def drain(child) -> None:
    """Read what the program wrote (answering cursor position requests) so that the pty never fills up."""
    try:
        while True:
            if "\x1b[6n" in child.read_nonblocking(1 << 20, timeout=0.05):
                child.send("\x1b[20;1R")
    except (pexpect.TIMEOUT, pexpect.EOF):
        pass


def ask(child, text: str) -> tuple[int, str]:
    """Send a typed message; return (tokens read by the turn, the screen output of the reply)."""
    child.send(text + "\r")
    shown = expect(child, TURN_END)
    read = int(child.match.group(1).replace(",", ""))
    expect(child, "USER:")
    return read, shown


def paste(child, document: str) -> int:
    """Bracketed paste (newlines as a terminal sends them, CR), then Enter; return the tokens read."""
    data = "\x1b[200~" + document.replace("\n", "\r") + "\x1b[201~"
    for start in range(0, len(data), 2048):
        child.send(data[start:start + 2048])
        drain(child)  # the echo must not fill the pty while we write
    child.send("\r")
    expect(child, TURN_END)
    read = int(child.match.group(1).replace(",", ""))
    expect(child, "USER:")
    return read


@pytest.mark.slow
def test_fact_survives_a_long_paste_and_a_restart(tmp_path, embedded_model):
    tokenizer = embedded_model[1]
    document = "\n\n".join([PARAGRAPH] * 29)
    doc_tokens = len(tokenizer(document, add_special_tokens=False)["input_ids"])
    assert doc_tokens > 8192

    child = spawn(tmp_path)
    ask(child, FACT)
    read = paste(child, document)
    assert doc_tokens <= read <= doc_tokens + 16  # one message: the document, its framing, nothing else
    read, shown = ask(child, QUESTION)
    assert ANSWER in shown
    child.sendcontrol("d")
    expect(child, pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    question_tokens = len(tokenizer(QUESTION, add_special_tokens=False)["input_ids"])
    child = spawn(tmp_path)
    assert "resumed session 'e2e'" in child.startup
    expect(child, TOOLBAR)  # the statistics wait in the prompt's bottom toolbar
    assert int(child.match.group(1).replace(",", "")) > doc_tokens
    read, shown = ask(child, QUESTION)
    # Only the new message and its framing (<|im_start|>user ... <|im_start|>assistant): nothing re-read.
    assert read <= question_tokens + 10
    assert ANSWER in shown
    child.send("!!stats\r")
    table = expect(child, "rollbacks")  # the row after the one we read
    read_since_start = re.search(r"tokens read since start-up\W+([\d,]+)", table).group(1)
    assert int(read_since_start.replace(",", "")) <= question_tokens + 10 + 2 * 12 + 4
    expect(child, "USER:")
    child.send("!!exit\r")
    expect(child, pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
