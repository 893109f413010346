"""Quality of the committed tiny parent: held-out perplexity and in-context SCAN exact match.

Measured on the saved directory with transformers (``LlamaForCausalLM.from_pretrained`` and
``generate``, greedy), on CPU unless ``--device`` says otherwise:

- perplexity on ``examples/tiny/data/valid.txt`` (documents packed as ``<s> doc </s>`` into
  windows of ``--seq-len`` tokens, as in training), overall and for the two kinds of document;
- exact match on held-out SCAN ``template`` queries: ``valid`` (unseen commands of the training
  distribution) and ``test`` (the compositional ``around right`` part), demonstrations drawn as
  in training.

Run: ``python benchmarks/bench_tiny_parent.py [--parent examples/tiny/parent] [--n 200]``.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
from puzzle.data.corpus import read_documents
from puzzle.data.tasks import evaluate_exact_match, scan_task_examples
from puzzle.generation import HFTextGenerator

ROOT = Path(__file__).resolve().parents[1]


def perplexity(model, tokenizer, docs: list[str], seq_len: int, device: str) -> float:
    """exp(mean next-token NLL) over ``docs`` packed into ``seq_len`` windows."""
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend([tokenizer.bos_token_id, *enc, tokenizer.eos_token_id])
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids) - 1, seq_len):
            window = torch.tensor(ids[i : i + seq_len], device=device)[None]  # (1, T)
            if window.shape[1] < 2:
                break
            loss = model(input_ids=window, labels=window).loss  # mean over T - 1 predictions
            total_nll += float(loss) * (window.shape[1] - 1)
            total_tokens += window.shape[1] - 1
    return math.exp(total_nll / total_tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parent", default=str(ROOT / "examples/tiny/parent"))
    ap.add_argument("--valid-text", default=str(ROOT / "examples/tiny/data/valid.txt"))
    ap.add_argument("--n", type=int, default=200, help="exact-match items per part")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(args.parent).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.parent)
    docs = read_documents(args.valid_text)
    episodes = [d for d in docs if d.startswith("source: ")]
    filler = [d for d in docs if not d.startswith("source: ")]

    start = time.perf_counter()
    result = {
        "parent": args.parent,
        "parameters": sum(p.numel() for p in model.parameters()),
        "valid_perplexity": perplexity(model, tokenizer, docs, args.seq_len, args.device),
        "valid_perplexity_episodes": perplexity(model, tokenizer, episodes, args.seq_len, args.device),
        "valid_perplexity_filler": perplexity(model, tokenizer, filler, args.seq_len, args.device),
    }
    generate = HFTextGenerator(model, tokenizer, batch_size=32)
    for part in ("valid", "test"):
        items = scan_task_examples(args.n, args.seed, split="template", part=part)
        r = evaluate_exact_match(generate, items, batch_size=32)
        result[f"exact_match_template_{part}"] = r["accuracy"]
        result[f"n_{part}"] = r["n"]
        result[f"errors_{part}"] = r["errors"][:2]
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["machine"] = (
        f"{platform.machine()} {platform.processor() or ''} {args.device} threads={args.threads}".strip()
    )
    result["torch"] = torch.__version__
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
