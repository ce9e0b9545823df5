"""Analysis of vote_heads_probe.py's files: for each case, which of the answer's needles the question's vote would
hold (the fraction of each needle's blocks among the 16 places) if each layer's rise were computed another way, with
the preset's first-stage shortlist of 512 (sl512) or over every block (all); V0 with sl512 is the preset's rule and
must reproduce its chosen blocks. Usage: python docs/bench/vote_heads_analysis.py "FOLDER/multiquery-65536*"."""
import sys, glob, torch
from inf_llm.memory.ranking import tally_votes, voted_places

def variants(L):
    P, Bp = L["P"].float(), L["Bp"].float()
    Be = L["Be"].float() if L["Be"] is not None else torch.full_like(P, -1e9)
    B = torch.maximum(Bp, Be)
    return {
        "V0 P-B": P.sum(1) - B.sum(1),
        "V1 P-Be": P.sum(1) - (Be.sum(1) if L["Be"] is not None else 0),
        "V2 P-Bp": P.sum(1) - Bp.sum(1),
        "V3 P": P.sum(1),
        "V4 relu": (P - B).clamp(min=0).sum(1),
        "V5 maxh": (P - B).amax(1),
        "V6 relu-e": (P - (Be if L["Be"] is not None else Bp)).clamp(min=0).sum(1),
    }

def top(score, k, first=None, short=512):
    if first is not None:
        cand = torch.sort(first.float(), descending=True, stable=True).indices[:short].sort().values
        s = torch.full_like(score, -float("inf")); s[cand] = score[cand]; score = s
    return torch.sort(score, descending=True, stable=True).indices[:k].tolist()

def needle_cov(rec, chosen):
    s = set(chosen)
    return [sum(b in s for b in rec["needles"][i]) / len(rec["needles"][i]) for i in rec["answer_needles"]]

files = sorted(glob.glob(sys.argv[1]))
for f in files:
    rec = torch.load(f)
    nb = rec["num_blocks"]
    print(f.split("/")[-1], "score", rec["score"], repr(rec["reply"][:70]))
    print("  needles", [rec["needles"][i] for i in rec["answer_needles"]], "preset cov", [round(x, 2) for x in needle_cov(rec, rec["end_blocks"])])
    names = list(variants(rec["layers"][0]).keys())
    for name in names:
        for sl in (True, False):
            votes, ranks = [], []
            for L in rec["layers"]:
                sc = variants(L)[name]
                votes.append(top(sc, 16, L["first"] if sl else None))
                order = torch.argsort(torch.argsort(sc, descending=True, stable=True))
                ranks.append([int(order[[b for b in rec["needles"][i] if b < len(order)]].min()) if any(b < len(order) for b in rec["needles"][i]) else 9999 for i in rec["answer_needles"]])
            chosen = voted_places(tally_votes(votes, "rank"), 16, 2, nb)
            cov = needle_cov(rec, chosen)
            if sl and name.startswith("V0"):
                print("  reproduces preset:", sorted(chosen) == sorted(rec["end_blocks"]))
            tag = "sl512" if sl else "all  "
            med = [sorted(r[j] for r in ranks)[len(ranks) // 2] for j in range(len(rec["answer_needles"]))]
            best = [min(r[j] for r in ranks) for j in range(len(rec["answer_needles"]))]
            n3 = [sum(r[j] < 3 for r in ranks) for j in range(len(rec["answer_needles"]))]
            print(f"  {name:10s} {tag} cov {[round(x, 2) for x in cov]}" + ("" if sl else f"  median rank {med} best {best} layers<3 {n3}"))
