"""Resume a saved session vs re-read the conversation: the time to get back a long memory after a restart.

    python -m chat.resume_benchmark --tokens 32768            # the embedded model, a filler-text document
    python -m chat.resume_benchmark --tokens 32768 --random-weights --device cuda   # its shape, random weights

It feeds N tokens into a fresh engine (what a chat without sessions would do on restart), saves the session
(every block: the first save), feeds one more turn and saves again (only what is not on disk yet: the chat
saves after every turn), then resumes the session into a second engine (state checked, blocks mapped, not
read), checks both give the same next-token logits, and prints the times and the bytes each save wrote.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from inf_llm.config.files import load_config
from inf_llm.config.presets import default_preset_for
from inf_llm.generation.engine import Engine
from inf_llm.sessions.store import resume_session, save_session

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def _random_smollm2(device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval().requires_grad_(False)
    return model, None


def _disk_bytes(folder: Path) -> int:
    """Bytes the files under `folder` occupy on disk (allocated blocks: data files grow sparse)."""
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--random-weights", action="store_true", help="SmolLM2-135M's shape, random weights")
    parser.add_argument("--turn-tokens", type=int, default=256, help="tokens of the turn between the two saves")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    if args.random_weights:
        model, tokenizer = _random_smollm2(args.device)
        ids = torch.randint(0, 49152, (args.tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    else:
        from inf_llm.model.loading import load_model

        model, tokenizer = load_model(None, device=args.device)
        text = FILLER * (args.tokens // 20 + 1)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.tokens]
    config = load_config(default_preset_for(None)).config
    results = {"tokens": len(ids), "device": args.device, "model": "random SmolLM2 shape" if args.random_weights
               else "embedded SmolLM2-135M-Instruct", "torch_threads": torch.get_num_threads()}

    first = Engine(model, tokenizer, config)
    _sync(args.device)
    t0 = time.perf_counter()
    first.feed(ids[: -args.turn_tokens - 1])
    _sync(args.device)
    results["reread_s"] = time.perf_counter() - t0

    turn = ids[-args.turn_tokens - 1 : -1]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.session"
        t0 = time.perf_counter()
        save_session(path, first, [], {"template": "bench"})
        results["save_s"] = time.perf_counter() - t0
        results["save_mb"] = _disk_bytes(path) / 1e6
        first.feed(turn)
        t0 = time.perf_counter()
        save_session(path, first, [], {"template": "bench"})
        results["turn_save_s"] = time.perf_counter() - t0
        results["turn_save_mb"] = _disk_bytes(path) / 1e6 - results["save_mb"]
        second = Engine(model, tokenizer, config)
        _sync(args.device)
        t0 = time.perf_counter()
        resume_session(path, second, {"template": "bench"})
        _sync(args.device)
        results["resume_s"] = time.perf_counter() - t0
        a = first.feed(ids[-1:])
        b = second.feed(ids[-1:])
    results["same_logits"] = bool(torch.equal(a, b))
    results["speedup"] = results["reread_s"] / results["resume_s"]
    print(f"{'tokens':>8} {'re-read s':>10} {'save s':>8} {'MB':>6} {'turn save s':>12} {'MB':>5} {'resume s':>9} "
          f"{'speed-up':>9} same logits")
    print(f"{results['tokens']:>8} {results['reread_s']:>10.1f} {results['save_s']:>8.2f} {results['save_mb']:>6.0f} "
          f"{results['turn_save_s']:>12.3f} {results['turn_save_mb']:>5.1f} {results['resume_s']:>9.2f} "
          f"{results['speedup']:>8.0f}x {results['same_logits']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if results["same_logits"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
