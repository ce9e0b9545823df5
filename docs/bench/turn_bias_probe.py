"""Probe behind BENCHMARKS.md, "The dialogue on three more seeds, and memory weighed less at decoding steps":
BIAS subtracted, at decoding steps, from the logits of the global keys that precede the prompt being answered (the
question's message: the multi-query chunks that follow the last decoding step), the current prompt's own keys
unchanged; so a one-message case is answered as the preset answers it, and in a dialogue the pasted document weighs
less when the question is answered, not when the document's own reply is. A code change for the probe (an extra
query/key channel carries the bias), not kept. Cases asked as a dialogue (`converse`) or in one message (`answer`,
at least one token), a JSON record each.

    OMP_NUM_THREADS=1 python docs/bench/turn_bias_probe.py dialogue|one LENGTH TASK:DEPTH:SEED,... OUT.jsonl BIAS ...
"""
import sys, torch, json, dataclasses
import inf_llm.memory.layer_state as ls
import inf_llm.memory.layer_memory as lm
from inf_llm.bench.prose import converse, answer
from inf_llm.bench.prose_tasks import build_prose_prompt
from inf_llm.config.files import load_config
from inf_llm.config.presets import default_preset_for
from inf_llm.generation.engine import Engine
from inf_llm.model.loading import load_model
torch.set_num_threads(1)
BIAS = [0.0]; NOLD = [0]

def biased(ops):
    """The backend's chunk attention with BIAS off the logits of the first NOLD global keys at decoding steps: an
    extra channel, 1 in the query and -BIAS/scale in those keys, adds exactly -BIAS to their logits."""
    def chunk_attention(q_local, k_local, v_local, q_global, k_global, v_global, scale, **kwargs):
        n_old = NOLD[0] if q_local.shape[2] == 1 else 0
        if n_old and BIAS[0] and k_global.shape[2]:
            extra = torch.zeros(*k_global.shape[:-1], 1, dtype=k_global.dtype)
            extra[:, :, :n_old] = -BIAS[0] / scale
            q_global = torch.cat((q_global, torch.ones(*q_global.shape[:-1], 1, dtype=q_global.dtype)), -1)
            k_global = torch.cat((k_global, extra), -1)
        return ops.chunk_attention(q_local, k_local, v_local, q_global, k_global, v_global, scale, **kwargs)
    return dataclasses.replace(ops, chunk_attention=chunk_attention)

orig_init = ls.LayerState.__init__
def init(self, config, shape, rotary, ops, *a, **k):
    orig_init(self, config, shape, rotary, biased(ops), *a, **k)
ls.LayerState.__init__ = init

orig_chunk = lm.LayerMemory._chunk
def _chunk(self, q, k, v, scale):
    c = q.shape[1]
    prev = getattr(self, "_probe_prev", 1)
    if self.num_seen == 0 or (c > 1 and prev == 1):
        self._probe_start = self.num_seen
    self._probe_prev = c
    return orig_chunk(self, q, k, v, scale)
lm.LayerMemory._chunk = _chunk

orig_gk = lm.LayerMemory._global_keys
def _global_keys(self, chosen, comp_k, comp_v):
    glob_k, glob_v, m = orig_gk(self, chosen, comp_k, comp_v)
    start = getattr(self, "_probe_start", 0)
    cfg = self.config
    s = self.sink_k.shape[1]
    pos = [torch.arange(s)]
    if chosen is not None:
        ids = chosen.tensor().cpu()
        pos.append((s + ids[:, None] * cfg.block_size + torch.arange(cfg.block_size)).reshape(-1))
    allpos = torch.cat(pos)
    rest = glob_k.shape[1] - allpos.numel()  # the remainder, then the complement keys: contiguous after the blocks
    rem_start = s + self.blocks.num_blocks * cfg.block_size
    allpos = torch.cat((allpos, torch.arange(rem_start, rem_start + rest)))
    n_old = int((allpos < start).sum())
    assert allpos.numel() == glob_k.shape[1]
    NOLD[0] = n_old
    return glob_k, glob_v, m
lm.LayerMemory._global_keys = _global_keys

model, tok = load_model(None, device="cpu")
mode, length = sys.argv[1], int(sys.argv[2]); cases = [c.split(":") for c in sys.argv[3].split(",")]
out = open(sys.argv[4], "a")
for v in sys.argv[5:]:
    BIAS[0] = float(v)
    config = load_config(default_preset_for(None)).config
    engine = Engine(model, tok, config)
    scores = []
    for task, depth, seed in cases:
        prompt = build_prose_prompt(tok, task, length, float(depth), int(seed))
        if mode == "dialogue":
            r = converse(engine, prompt)
            rec = {"paste": r["paste_reply"], "replies": [t["reply"] for t in r["turns"]]}
        else:
            r = answer(engine, prompt, min_new_tokens=1)
            rec = {"replies": [r["reply"]]}
        scores.append(r["score"])
        out.write(json.dumps({"bias": BIAS[0], "rule": "turn", "mode": mode, "task": task, "depth": depth, "seed": seed, "length": length, "score": r["score"], **rec}) + "\n"); out.flush()
        print(mode, v, task, depth, seed, r["score"], repr(rec["replies"][0][:70]), flush=True)
    print("==", mode, v, sum(scores) / len(scores), flush=True)
