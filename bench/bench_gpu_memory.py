"""GPU memory of a kseed client (issue #11): the device holds the model plus O(MB); w0 stays on the host.

    python bench/bench_gpu_memory.py [--layers 8] [--hidden 1024] [--k 256] [--steps 3] [--smoke]

Builds a LLaMA-shaped bf16 model (default hidden 1024, intermediate 2816, 8 layers, 8 heads, 4 KV heads,
vocab 32000: about 0.17B parameters) into a temporary directory, loads it with kseed.modeling.load_model
on "cuda", makes a Workspace (w0: a map of the model file in host memory; cache=True: the round snapshot
in a host file) and measures torch.cuda.max_memory_allocated beyond the bytes the loaded model holds:
  1. a rebuild from K nonzero coefficients (w0 copied in per tensor, then one fused in-place pass);
  2. a second rebuild with the same coefficients (restored from the host snapshot);
  3. --steps ZO steps (ModelSeeds.zo_step) on a 1 x 96-token batch (activations included).
PASS: w0 and the snapshot are host tensors, the rebuilds add at most 64 MiB and the ZO steps at most
256 MiB + 10% of the model.  --smoke runs the same on CPU with a tiny model (plumbing only; no numbers).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]
MIB = float(1 << 20)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kseed import modeling as M

    dev = "cpu" if a.smoke else "cuda"
    if not a.smoke and not torch.cuda.is_available():
        print("no CUDA GPU: run with --smoke for the plumbing")
        return 2
    hidden, layers, vocab = (64, 2, 1024) if a.smoke else (a.hidden, a.layers, 32000)
    tmp = tempfile.mkdtemp(prefix="kseed_gpu_mem_")
    os.environ.setdefault("KSEED_CACHE", os.path.join(tmp, "cache"))
    tok = AutoTokenizer.from_pretrained(M.EMBEDDED_DIR)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 64 * 64 or 160,
                      num_hidden_layers=layers, num_attention_heads=8 if not a.smoke else 4,
                      num_key_value_heads=4 if not a.smoke else 2, vocab_size=vocab,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(os.path.join(tmp, "model"))
    tok.save_pretrained(os.path.join(tmp, "model"))

    t0 = time.perf_counter()
    model, tok = M.load_model(os.path.join(tmp, "model"), "bf16", dev)
    ws = M.Workspace(model, tok, cache=True)
    load_s = time.perf_counter() - t0
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    host = all(w.device.type == "cpu" for w in ws.w0)
    g = torch.Generator().manual_seed(1)
    seeds = np.array(torch.randint(0, 2**62, (a.k,), generator=g).tolist(), dtype=np.uint64)
    coefs = (torch.randn(a.k, generator=g) * 1e-4).numpy()
    ids = torch.randint(3, 500, (1, 96), generator=g).to(dev)
    labels = ids.clone()
    labels[:, :32] = -100
    batch = (ids, torch.ones_like(ids), labels)

    def peak(fn):
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        fn()
        if dev == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base, time.perf_counter() - t, base
        return 0, time.perf_counter() - t, 0

    rows = []
    extra, s, base = peak(lambda: ws.rebuild(seeds, coefs))
    rows.append(("rebuild, K = %d (staged from host w0)" % a.k, extra, s))
    ws.ms.perturb(5, 1e-3)
    extra, s, _ = peak(lambda: ws.rebuild(seeds, coefs))
    rows.append(("rebuild again (host snapshot)", extra, s))
    step = lambda: [ws.ms.zo_step(100 + i, lambda: M.batch_loss(ws.model, batch), eps=1e-3, lr=1e-6)  # noqa: E731
                    for i in range(a.steps)]
    extra, s, _ = peak(step)
    rows.append((f"{a.steps} ZO steps, 1 x 96 tokens", extra, s / max(a.steps, 1)))
    snap_host = all(t.device.type == "cpu" for t in ws._snapshot.tensors)
    print(f"device {torch.cuda.get_device_name(0) if dev == 'cuda' else 'cpu (smoke)'}; model "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, bf16, {model_bytes / MIB:.0f} MiB; "
          f"allocated after load {base / MIB:.0f} MiB; load + workspace {load_s:.1f} s; w0 on host: "
          f"{host} ({ws.w0_source}); snapshot on host: {snap_host}")
    print(f"{'what':40} {'extra MiB':>10} {'seconds':>8}")
    for name, e, s in rows:
        print(f"{name:40} {e / MIB:10.1f} {s:8.3f}")
    ok = host and snap_host and (a.smoke or (rows[0][1] <= 64 * MIB and rows[1][1] <= 64 * MIB and
                                              rows[2][1] <= 256 * MIB + 0.1 * model_bytes))
    print("memory:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
