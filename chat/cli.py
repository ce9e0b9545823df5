"""Command-line flags (fastchat's names where fastchat has them) and start-up: model, config, format, session."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# inf_llm.generation.sampling.CHAT_DEFAULTS, without importing torch (`python -m chat --help` needs none); a test keeps them equal.
DEFAULTS = {"temperature": 0.7, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.2, "min_new_tokens": 1}

DESCRIPTION = """Chat with a model whose context memory is InfLLM: conversations and pasted documents of any
length, read once. Type !!help in the chat for the commands."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inf-llm-chat", description=DESCRIPTION)
    p.add_argument("--model-path", default=None,
                   help="Hugging Face checkpoint folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--inf-llm-config-path", default=None,
                   help="InfLLM config: a YAML file (ours or the reference InfLLM's) or a preset name such as "
                        "smollm2-full (an unknown name lists the presets; default: the model's preset)")
    p.add_argument("--conv-template", default=None,
                   help="fastchat conversation template name (default: the tokenizer's own chat template)")
    p.add_argument("--conv-system-msg", default=None, help="system message (default: the template's)")
    # Sampling: a flag wins; else the model's generation config, where it sets the value; else our default
    # (`inf_llm.generation.sampling.CHAT_DEFAULTS`, chosen for the embedded model, whose generation config sets none).
    p.add_argument("--temperature", type=float, default=None,
                   help=f"0 = greedy (default: the model's generation config's, else {DEFAULTS['temperature']})")
    p.add_argument("--top-p", type=float, default=None,
                   help=f"(default: the model's generation config's, else {DEFAULTS['top_p']}: off)")
    p.add_argument("--top-k", type=int, default=None,
                   help=f"0 = no limit (default: the model's generation config's, else {DEFAULTS['top_k']})")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="on the reply's own tokens, as transformers' with the prompt ignored (default: the model's "
                        f"generation config's, else {DEFAULTS['repetition_penalty']})")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--min-new-tokens", type=int, default=None,
                   help="the reply's first N tokens are never the end of the turn (default: "
                        f"{DEFAULTS['min_new_tokens']}: no reply ends before its first token; 0 = the model's choice)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed, for reproducible replies")
    p.add_argument("--style", choices=("rich", "simple"), default=None,
                   help="rich: markdown, live statistics, progress bars (default on a terminal); "
                        "simple: plain text for pipes and scripts (default otherwise)")
    p.add_argument("--multiline", action="store_true",
                   help="Enter inserts a newline; Esc then Enter sends (simple style: an empty line sends)")
    p.add_argument("--session", metavar="NAME", default=None,
                   help="resume session NAME if it exists (else start it); it is saved after every turn. Refused "
                        "while another process has it open")
    p.add_argument("--read-only", action="store_true",
                   help="with --session: resume the session without ever saving to it (also while another process "
                        "has it open); !!save NEW saves the conversation as session NEW and continues there")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="spread a model too big for one GPU over several with accelerate (e.g. 'auto'); each layer's "
                        "memory then lives on that layer's device. Replaces --device")
    p.add_argument("--debug", action="store_true", help="log at DEBUG level to stderr")
    return p


def _sampling_flags(args) -> dict:
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                min_new_tokens=args.min_new_tokens, seed=args.seed)


def _resolve_device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_config(arg: str | None):
    """(InfLLMConfig | None, model_path | None, conv_template | None) from a file or a preset name."""
    from inf_llm.config.files import load_config
    from inf_llm.config.presets import preset_path

    if arg is None:
        return None, None, None
    path = Path(arg).expanduser()
    loaded = load_config(path if path.exists() or arg.endswith((".yaml", ".yml")) else preset_path(arg))
    for note in loaded.notes:
        logging.getLogger("chat").warning("%s", note)
    return loaded.config, loaded.model_path, loaded.conv_template


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.read_only and args.session is None:
        parser.error("--read-only opens a saved session: give --session NAME")
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    style = args.style or ("rich" if sys.stdin.isatty() and sys.stdout.isatty() else "simple")
    # Imported after argument parsing: `python -m chat --help` then needs no torch.
    from inf_llm.generation.sampling import SamplingParams

    try:
        # Checked before the model loads; the model's generation config fills in the settings no flag gives.
        SamplingParams(**{name: value for name, value in _sampling_flags(args).items() if value is not None})
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from inf_llm.sessions.lock import SessionBusyError, SessionLock
    from inf_llm.sessions.names import SessionError, session_path

    lock = None
    try:
        if args.session is not None:
            path = session_path(args.session)  # a bad name fails before the model loads
            if not args.read_only:
                # So does a session another process holds: two writers would each overwrite the other's turns.
                lock = SessionLock(path)
                lock.acquire()
    except SessionBusyError as error:
        print(f"error: {error}. Close the other chat first, or add --read-only to resume it without saving to it",
              file=sys.stderr)
        return 2
    except SessionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        return _start(args, style, lock)
    finally:
        if lock is not None:
            lock.release()  # on every way out; the chat releases it sooner when it binds another session


def _start(args, style: str, lock) -> int:
    """Load the model, then chat; `lock`: the session's, already held (None without --session, or read-only)."""
    from inf_llm.config.files import load_config
    from inf_llm.config.presets import default_preset_for
    from inf_llm.config.schema import ConfigError
    from inf_llm.generation.engine import Engine
    from inf_llm.generation.sampling import resolve_params
    from inf_llm.model.loading import ModelLoadError, load_model
    from inf_llm.sessions.names import SessionError

    from chat.app import ChatApp
    from chat.chat_format import ChatFormat, ChatFormatError
    from chat.conversation import Conversation
    from chat.stats import status_line

    try:
        config, config_model_path, config_template = _load_config(args.inf_llm_config_path)
        model_path = args.model_path or config_model_path
        print("loading the model...", file=sys.stderr, flush=True)
        if args.device_map is not None:
            model, tokenizer = load_model(model_path, device=None, device_map=args.device_map)
        else:
            model, tokenizer = load_model(model_path, device=_resolve_device(args.device))
        if config is None:
            preset = default_preset_for(None if model_path is None else model.config.model_type)
            config = load_config(preset).config
        try:
            engine = Engine(model, tokenizer, config)
        except (RuntimeError, MemoryError) as error:  # torch's allocation failures (OutOfMemoryError included)
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"cannot set up the InfLLM memory with these settings (device_cache_blocks="
                             f"{config.device_cache_blocks}, block_size={config.block_size}): {first}") from error
        chat_format = ChatFormat.create(tokenizer, args.conv_template or config_template, args.conv_system_msg)
    except (ConfigError, ModelLoadError, ChatFormatError, SessionError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    try:
        params, origin = resolve_params(getattr(model, "generation_config", None), **_sampling_flags(args))
    except ValueError as error:
        print(f"error: the model's generation config: {error}; give the setting as a flag", file=sys.stderr)
        return 2
    logging.getLogger("chat").debug("sampling: %s", ", ".join(
        f"{name} {getattr(params, name)} ({origin[name]})" for name in origin))
    conversation = Conversation(engine, chat_format, params)
    if style == "rich":
        from chat.rich_ui import RichUI

        ui = RichUI(lambda step: status_line(conversation, step.memory if step else None,
                                             step.decode_ms_per_token if step else None),
                    user=chat_format.user_name, multiline=args.multiline)
    else:
        from chat.simple_ui import SimpleUI

        ui = SimpleUI(user=chat_format.user_name, assistant=chat_format.assistant_name, multiline=args.multiline)
    app = ChatApp(conversation, ui)
    if args.session is not None and not app.open_session(args.session, read_only=args.read_only, lock=lock):
        return 2  # refused: never continue (and autosave) over a session we could not read
    ui.info(f"{config.method} memory on {engine.device}; type !!help for commands, Ctrl-D or !!exit to quit")
    return app.run()
