"""llama.cpp runs our exported children with our logits: ``puzzle export gguf`` checked against llama.cpp itself.

For the tiny parent converted to a child (every layer the parent's) and for heterogeneous children made
from it (no_op attention in layer 0, GQA of other group sizes, linear attention, smaller FFNs, no_op FFNs
in the middle and in the last layer; replacement blocks made by Puzzle's own initialization from the
parent, ``puzzle.model.init``: deterministic), each child is exported to GGUF (f32 by default) and loaded
by llama.cpp through its Python binding. On several prompts from ``examples/tiny/data/valid.txt``
(token ids from the Hugging Face tokenizer, so tokenization plays no part) it compares:

- max |log-softmax difference| between llama.cpp's and our ``DeciLMForCausalLM``'s next-token
  distributions, over every prompt position and every position llama.cpp decoded with its KV cache
  (with ``--dtype f16|bf16`` ours computes in f32 with its matrices rounded as the file holds them);
- greedy tokens: llama.cpp's own decode loop (argmax of its logits, one token at a time) against our
  ``generate`` (static KV cache), over ``--new-tokens`` tokens per prompt.

It also reports how llama.cpp's tokenizer, given each candidate ``--pre-tokenizer`` name, agrees with the
Hugging Face tokenizer on the validation documents (the tiny parent's split regex is not one llama.cpp
has, so the export needs a name; the best one is the one to use).

llama.cpp comes from the ``llama-cpp-python`` source package, built once into its own virtualenv (it
compiles llama.cpp with cmake; 10-40 minutes on 2 cores):

    python3 -m venv /work/venv-llamacpp
    CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 \\
        /work/venv-llamacpp/bin/pip install --no-binary :all: llama-cpp-python==0.3.36

Run (the project's Python; llama.cpp's side runs in ``--llama-python``, a subprocess of this script):

    python3 benchmarks/bench_llamacpp.py [--llama-python /work/venv-llamacpp/bin/python] [--dtype f32]

Prints a table and one JSON object (``--json FILE`` writes it too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PRE_CANDIDATES = ("superbpe", "bloom", "gpt-2", "llama-bpe", "default")


# ----- llama.cpp's side (runs in the llama-cpp-python virtualenv) ---------------------------------------
def llama_worker(spec_path: str, out_path: str) -> None:
    """Evaluate the spec's prompts with llama.cpp: logits of every position and greedy decoding."""
    from llama_cpp import Llama

    spec = json.loads(Path(spec_path).read_text())
    out: dict[str, np.ndarray] = {}
    meta: dict = {"runs": []}
    for run in spec["runs"]:
        t0 = time.perf_counter()
        # type_k/type_v: the KV cache's ggml type (0 = f32, 1 = f16, llama.cpp's default)
        llm = Llama(model_path=run["gguf"], n_ctx=spec["n_ctx"], n_batch=spec["n_ctx"], logits_all=True,
                    n_threads=spec["threads"], verbose=False, type_k=spec["kv_type"], type_v=spec["kv_type"])
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for p, ids in enumerate(run["prompts"]):
            llm.reset()
            llm.eval(ids)
            gen = []
            for step in range(spec["new_tokens"]):
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                gen.append(tok)
                if step < spec["new_tokens"] - 1:
                    llm.eval([tok])  # one decode step through llama.cpp's KV cache
            out[f"{run['name']}/{p}/logits"] = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)  # (T+N-1, V)
            out[f"{run['name']}/{p}/greedy"] = np.array(gen, dtype=np.int64)
        meta["runs"].append({"name": run["name"], "load_s": load_s, "eval_s": time.perf_counter() - t0})
        del llm
    for name, (path, texts) in spec.get("tokenize", {}).items():
        llm = Llama(model_path=path, vocab_only=True, verbose=False)
        for i, text in enumerate(texts):
            out[f"tok/{name}/{i}"] = np.array(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
        del llm
    import llama_cpp

    meta["llama_cpp_python"] = llama_cpp.__version__
    np.savez(out_path, **out)
    Path(out_path + ".json").write_text(json.dumps(meta))


# ----- our side -----------------------------------------------------------------------------------------
def make_children(parent, calib_ids):
    """{name: child model}: the parent itself and heterogeneous children initialized from it."""
    import copy

    import torch
    from puzzle.model import AttentionVariant as A
    from puzzle.model import FFNVariant as F
    from puzzle.model import init_attention, init_ffn

    cfg = parent.config
    n, inter = cfg.num_hidden_layers, parent.model.layers[0].mlp.variant.intermediate_size
    with torch.no_grad():
        _, hidden = parent(calib_ids, output_hidden_states=True)  # n+1 of (B, T, C)
        attn_in = hidden[:-1]
        ffn_in = [parent.attn_sublayer(i, hidden[i]) for i in range(n)]

    def mixed(pattern):
        return [pattern[i % len(pattern)] for i in range(n)]

    half, quarter = F.exact(max(8, inter // 2)), F.exact(max(8, inter // 4))
    specs = {
        # layer 0 no_op attention, linear attention, GQA 4/8, a whole no_op layer, no_op FFN in the last layer
        "mixed-a": mixed([(A.noop(), F.exact(inter)), (A.gqa(4), half), (A.linear(), F.noop()),
                          (A.noop(), F.noop()), (A.gqa(cfg.num_attention_heads), quarter), (A.gqa(1), half)]),
        "mixed-b": mixed([(A.linear(), half), (A.gqa(1), F.exact(inter)), (A.noop(), quarter),
                          (A.gqa(4), F.noop()), (A.noop(), F.exact(inter)), (A.linear(), quarter)]),
    }
    specs["mixed-a"][-1] = (specs["mixed-a"][-1][0], F.noop())
    specs["mixed-b"][-1] = (A.linear(), F.noop())
    children = {"parent": parent}
    for name, layers in specs.items():
        child = copy.deepcopy(parent)
        for i, (a, f) in enumerate(layers):
            child.set_attention(i, a, init_attention(a, parent, i, attn_in[i]))
            child.set_ffn(i, f, init_ffn(f, parent, i, ffn_in[i]))
        children[name] = child
    return children


def rounded_like_the_file(model, dtype: str):
    """The model with its matrices rounded to the GGUF's dtype (norms stay f32, as in the file), computed in
    f32: our logits for exactly the weights llama.cpp reads."""
    import copy

    import torch

    if dtype == "f32":
        return model
    out = copy.deepcopy(model)
    cast = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    with torch.no_grad():
        for p in out.parameters():
            if p.ndim > 1:
                p.copy_(p.to(cast).float())
    return out


def describe(model) -> str:
    return " ".join(f"{b.attention.name.removeprefix('attn_')}/{b.ffn.name.removeprefix('ffn_')}"
                    for b in model.block_configs)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--parent", default=str(ROOT / "examples/tiny/parent"))
    ap.add_argument("--valid-text", default=str(ROOT / "examples/tiny/data/valid.txt"))
    ap.add_argument("--llama-python", default="/work/venv-llamacpp/bin/python",
                    help="a Python with llama_cpp installed (llama-cpp-python)")
    ap.add_argument("--dtype", default="f32", help="GGUF dtype of the comparison: f32, f16 or bf16")
    ap.add_argument("--kv-cache", choices=("f32", "f16"), default="f32",
                    help="llama.cpp's KV cache type: f32 isolates the export; f16 is llama.cpp's default")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pre-tokenizer", default="superbpe",
                    help="written when the tokenizer's own is not one llama.cpp has")
    ap.add_argument("--tokenize-docs", type=int, default=300, help="validation documents for tokenizer agreement")
    ap.add_argument("--json", default=None)
    ap.add_argument("--work", default=None, help="keep the children and GGUF files here (default: a temporary dir)")
    args = ap.parse_args()
    if args.worker:
        llama_worker(*args.worker)
        return

    import torch
    from puzzle.data.corpus import read_documents
    from puzzle.data.tokenizer import load_tokenizer
    from puzzle.export.gguf import export_gguf
    from puzzle.model import load_parent, save_pretrained

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = load_tokenizer(args.parent)
    docs = read_documents(args.valid_text)
    rng = np.random.default_rng(0)
    lengths = np.linspace(8, 200, args.prompts).astype(int)
    prompts = []
    for length, j in zip(lengths, rng.choice(len(docs), args.prompts, replace=False), strict=True):
        ids = tok(docs[int(j)])["input_ids"]  # <s> + document, as the model saw them in training
        while len(ids) < length:  # short documents: append the next ones
            j = (j + 1) % len(docs)
            ids += tok(docs[int(j)], add_special_tokens=False)["input_ids"]
        prompts.append([int(t) for t in ids[:length]])
    parent = load_parent(args.parent)
    calib_ids = [t for d in docs[-40:] for t in tok(d)["input_ids"]][:256]
    calib = torch.tensor([calib_ids])  # (1, 256) calibration tokens for the initialization
    children = make_children(parent, calib)

    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="bench-llamacpp-")
    work = Path(args.work or tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    spec: dict = {"n_ctx": int(max(lengths)) + args.new_tokens + 8, "threads": args.threads,
                  "new_tokens": args.new_tokens, "runs": [], "tokenize": {},
                  "kv_type": {"f32": 0, "f16": 1}[args.kv_cache]}
    info = {}
    for name, model in children.items():
        d = save_pretrained(model, work / name, tokenizer_dir=args.parent)
        t0 = time.perf_counter()
        s = export_gguf(d, work / f"{name}.gguf", dtype=args.dtype, pre_tokenizer=args.pre_tokenizer)
        info[name] = {"export_s": time.perf_counter() - t0, "gguf_mib": s.path.stat().st_size / 2**20,
                      "layers": describe(model), "head_count": [p.head_count for p in s.layers],
                      "head_count_kv": [p.head_count_kv for p in s.layers],
                      "feed_forward_length": [p.feed_forward_length for p in s.layers]}
        spec["runs"].append({"name": name, "gguf": str(s.path), "prompts": prompts})
    texts = docs[: args.tokenize_docs]
    for pre in PRE_CANDIDATES:
        s = export_gguf(work / "parent", work / f"tok-{pre}.gguf", dtype="f16", pre_tokenizer=pre)
        spec["tokenize"][pre] = (str(s.path), texts)
    (work / "spec.json").write_text(json.dumps(spec))
    t0 = time.perf_counter()
    subprocess.run([args.llama_python, __file__, "--worker", str(work / "spec.json"), str(work / "out.npz")],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    worker_s = time.perf_counter() - t0
    got = np.load(work / "out.npz")
    meta = json.loads((work / "out.npz.json").read_text())

    rows = []
    for run in meta["runs"]:
        name = run["name"]
        model = rounded_like_the_file(children[name], args.dtype)
        max_diff, equal, total, positions, prefix = 0.0, 0, 0, 0, 0
        for p, ids in enumerate(prompts):
            lc_logits, lc_greedy = got[f"{name}/{p}/logits"], got[f"{name}/{p}/greedy"]
            seq = ids + [int(t) for t in lc_greedy[:-1]]  # the positions llama.cpp evaluated
            with torch.no_grad():
                ours = model(torch.tensor([seq]))[0].double().numpy()  # (T+N-1, V)
                ours_greedy = model.generate(torch.tensor([ids]), max_new_tokens=args.new_tokens)[0, len(ids):]
            max_diff = max(max_diff, float(np.abs(log_softmax(lc_logits) - log_softmax(ours)).max()))
            positions += len(seq)
            same = (ours_greedy.numpy() == lc_greedy)
            equal += int(same.all())
            total += 1
            first = int(np.argmin(same)) if not same.all() else len(same)
            prefix += first  # tokens equal before the first difference
            if first < len(same):
                print(f"  {name} prompt {p}: greedy differs from token {first}")
        rows.append({"child": name, **info[name], "positions": positions, "max_abs_logsoftmax_diff": max_diff,
                     "greedy_equal_prompts": equal, "prompts": total, "new_tokens": args.new_tokens,
                     "greedy_equal_tokens": prefix,
                     "llamacpp_load_s": run["load_s"], "llamacpp_eval_s": run["eval_s"]})

    agreement = {}
    for pre in PRE_CANDIDATES:
        same = sum(int(np.array_equal(got[f"tok/{pre}/{i}"], tok(t, add_special_tokens=False)["input_ids"]))
                   for i, t in enumerate(texts))
        agreement[pre] = same / len(texts)

    print(f"\nllama.cpp (llama-cpp-python {meta['llama_cpp_python']}) vs DeciLMForCausalLM, GGUF {args.dtype}, "
          f"{args.kv_cache} KV cache, {args.prompts} prompts of {lengths.min()}-{lengths.max()} tokens + "
          f"{args.new_tokens} greedy tokens")
    print(f"{'child':<8} {'layers (attention/ffn per layer)':<64} {'MiB':>5} {'positions':>9} {'max|dlogp|':>10} "
          f"{'greedy tokens =':>15}")
    for r in rows:
        print(f"{r['child']:<8} {r['layers']:<64} {r['gguf_mib']:>5.1f} {r['positions']:>9} "
              f"{r['max_abs_logsoftmax_diff']:>10.2e} {r['greedy_equal_tokens']:>7}/{r['prompts'] * r['new_tokens']:<7}")
    print("\ntokenizer agreement with Hugging Face on", len(texts), "validation documents, by --pre-tokenizer:")
    for pre, frac in agreement.items():
        print(f"  {pre:<10} {100 * frac:6.1f}% of documents tokenized identically")
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d"), "parent": args.parent, "dtype": args.dtype, "kv_cache": args.kv_cache,
              "llama_cpp_python": meta["llama_cpp_python"], "children": rows, "tokenizer_agreement": agreement,
              "llamacpp_worker_s": worker_s}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
