"""Probe behind BENCHMARKS.md, "A 512-token window" and "The sinks and the question's blocks near": with the
512-token window and memory at the window's distance, chosen parts of memory at distance NEAR instead (a code
change for the probe only; `sink_memory_distance` and `voted_memory_distance` are the settings it led to).

Parts: voted (the chosen blocks the prompt's end voted for), blocks (the other chosen blocks), sinks (those that
have left the window), rem (the remainder), or none. PARTS are placed near at every chunk and step; with the
environment variable DECODE_PARTS set, decoding steps place those instead. Each passkey line also says which of
the needle's blocks were voted for.

    OMP_NUM_THREADS=1 python docs/bench/memory_parts_probe.py passkey 128 voted        # the chat path, 4K and 8K
    OMP_NUM_THREADS=1 DECODE_PARTS=voted,sinks python docs/bench/memory_parts_probe.py multiquery 128 none
    OMP_NUM_THREADS=1 python docs/bench/memory_parts_probe.py passkey 128 none decode_memory_distance=512 \
        memory_distance=128                                                             # settings as overrides
"""
import os
import sys

import torch

from inf_llm.bench.methods import parse_overrides
from inf_llm.bench.prompt import build_passkey_prompt, needle_line
from inf_llm.bench.prose import answer, converse
from inf_llm.bench.prose_tasks import ProsePrompt, build_prose_prompt
from inf_llm.config.files import load_config
from inf_llm.config.presets import default_preset_for
from inf_llm.generation.engine import Engine
from inf_llm.memory.layer_memory import LayerMemory
from inf_llm.model.loading import load_model

torch.set_num_threads(1)
mode, near = sys.argv[1], int(sys.argv[2])
PARTS = set(sys.argv[3].split(","))
DECODE_PARTS = set(os.environ["DECODE_PARTS"].split(",")) if os.environ.get("DECODE_PARTS") else PARTS
overrides = sys.argv[4:]
config = load_config(default_preset_for(None)).config.replace(**parse_overrides(["local_window=512"] + overrides))
global_keys, chunk = LayerMemory._global_keys, LayerMemory._chunk


def near_parts(self, chosen, comp_k, comp_v):
    glob_k, glob_v, num_memory = global_keys(self, chosen, comp_k, comp_v)
    parts = DECODE_PARTS if self.probe_queries == 1 else PARTS
    far = self.config.distance_for(self.probe_queries)
    b, sinks = self.config.block_size, self.sink_k.shape[1]
    positions = torch.zeros(glob_k.shape[1], dtype=torch.long)
    if "sinks" in parts:
        positions[:sinks] = far - near
    n_keys = 0
    if chosen is not None:
        ids = chosen.tensor().cpu()
        voted = torch.isin(ids, self.end_blocks) if self.end_blocks is not None else torch.zeros_like(ids, dtype=torch.bool)
        picked = (voted if "voted" in parts else torch.zeros_like(voted)) | (~voted if "blocks" in parts else torch.zeros_like(voted))
        places = torch.nonzero(picked).flatten()
        positions[(sinks + places[:, None] * b + torch.arange(b)).flatten()] = far - near
        n_keys = ids.numel() * b
    if "rem" in parts:
        positions[sinks + n_keys : num_memory] = far - near
    if positions.any():
        glob_k = self.rotary.rotate_positions(glob_k, positions.to(glob_k.device)).to(glob_k.dtype)
    return glob_k, glob_v, num_memory


def counted_chunk(self, q, k, v, scale):
    self.probe_queries = q.shape[1]
    return chunk(self, q, k, v, scale)


LayerMemory._global_keys, LayerMemory._chunk = near_parts, counted_chunk
model, tok = load_model(None, device="cpu")
engine = Engine(model, tok, config)
label = f"{mode} near={near} parts={sorted(PARTS)} decoding={sorted(DECODE_PARTS)} {' '.join(overrides)}"
scores = []
if mode == "passkey":
    for length in (4096, 8192):
        for depth in (0.1, 0.5, 0.9):
            p = build_passkey_prompt(tok, length, depth, 0, answer_prefix="")
            prompt = ProsePrompt("single", p.ids, "", (str(p.key),), ((p.needle_token, p.needle_end),),
                                 (needle_line(p.key),), 0, (p.context_start, p.context_end), "")
            r = answer(engine, prompt)
            scores.append(r["score"])
            sinks, size = config.num_sink_tokens, config.block_size
            needle = set(range((p.needle_token - sinks) // size, (p.needle_end - 1 - sinks) // size + 1))
            voted = engine.memory.layers[0].end_blocks
            print(label, length, depth, "needle blocks", sorted(needle), "voted",
                  None if voted is None else sorted(needle & set(voted.tolist())), r["score"], repr(r["reply"][:60]),
                  flush=True)
else:
    for seed in (3, 4, 5):
        for depth in (0.1, 0.5, 0.9):
            r = converse(engine, build_prose_prompt(tok, mode, 4096, depth, seed))
            scores.append(r["score"])
            print(label, seed, depth, r["score"], [t["reply"][-9:] for t in r["turns"]], flush=True)
print("==", label, sum(scores) / len(scores), flush=True)
