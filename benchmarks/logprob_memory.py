"""Peak memory of token log-probs (+ backward) from [B, T, V] logits: the chunked hand-written kernel
against the plain log_softmax + gather, each in a fresh process (peak RSS).

    .venv/bin/python benchmarks/logprob_memory.py --batch 64 --seq 512 --vocab 32768 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def measure(method: str, batch: int, seq: int, vocab: int, dtype: str, threads: int) -> dict:
    import time

    import torch

    from ascend_rl.algorithms import log_probs_from_logits

    torch.set_num_threads(threads)
    logits = torch.randn(batch, seq, vocab, dtype=getattr(torch, dtype), requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if method == "chunked":
        lp = log_probs_from_logits(logits, labels)
    else:
        lp = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    lp.sum().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    logits_gib = logits.numel() * logits.element_size() / 2**30
    return {"method": method, "extra_peak_gib": round((peak - base) / 2**20, 2), "logits_gib": round(logits_gib, 2),
            "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", choices=("chunked", "plain"))
    args = parser.parse_args()
    if args.method:
        print(json.dumps(measure(args.method, args.batch, args.seq, args.vocab, args.dtype, args.threads)))
        return
    shape = f"[{args.batch}, {args.seq}, {args.vocab}] {args.dtype}, {args.threads} threads"
    print(f"log-probs + backward from logits {shape}; extra peak RSS beyond the logits themselves")
    for method in ("chunked", "plain"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--method", method],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip())


if __name__ == "__main__":
    main()
