"""Probe behind BENCHMARKS.md, "A 512-token window": the blocks the question voted for (prompt_end_blocks) placed
at distance NEAR, the rest of memory at the shared distance (the window's, 512 here): a code change for the probe
only (the voted blocks' keys are rotated to far - NEAR before the global stage, whose query sits at far).

    OMP_NUM_THREADS=1 python docs/bench/voted_near_probe.py passkey NEAR          # the chat path, 4K and 8K
    OMP_NUM_THREADS=1 python docs/bench/voted_near_probe.py multiquery NEAR       # the dialogue, seeds 3-5, 4K
"""
import sys, torch
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
config = load_config(default_preset_for(None)).config.replace(**parse_overrides(["local_window=512"]))
shift = config.global_distance - near
original = LayerMemory._global_keys


def voted_near(self, chosen, comp_k, comp_v):
    glob_k, glob_v, num_memory = original(self, chosen, comp_k, comp_v)
    if chosen is None or self.end_blocks is None:
        return glob_k, glob_v, num_memory
    ids = chosen.tensor().cpu()
    voted = torch.nonzero(torch.isin(ids, self.end_blocks)).flatten()
    if voted.numel():
        b, sinks = self.config.block_size, self.sink_k.shape[1]
        rows = (sinks + voted[:, None] * b + torch.arange(b)).flatten()
        positions = torch.zeros(glob_k.shape[1], dtype=torch.long)
        positions[rows] = shift
        glob_k = self.rotary.rotate_positions(glob_k, positions.to(glob_k.device)).to(glob_k.dtype)
    return glob_k, glob_v, num_memory


LayerMemory._global_keys = voted_near
model, tok = load_model(None, device="cpu")
engine = Engine(model, tok, config)
scores = []
if mode == "passkey":
    for length in (4096, 8192):
        for depth in (0.1, 0.5, 0.9):
            p = build_passkey_prompt(tok, length, depth, 0, answer_prefix="")
            prompt = ProsePrompt("single", p.ids, "", (str(p.key),), ((p.needle_token, p.needle_end),),
                                 (needle_line(p.key),), 0, (p.context_start, p.context_end), "")
            r = answer(engine, prompt)
            scores.append(r["score"])
            print(mode, near, length, depth, r["score"], repr(r["reply"][:60]), flush=True)
else:
    for seed in (3, 4, 5):
        for depth in (0.1, 0.5, 0.9):
            r = converse(engine, build_prose_prompt(tok, mode, 4096, depth, seed))
            scores.append(r["score"])
            print(mode, near, seed, depth, r["score"], [t["reply"][-9:] for t in r["turns"]], flush=True)
print("==", mode, near, sum(scores) / len(scores), flush=True)
