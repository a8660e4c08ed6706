"""One full zeroth-order step on a LLaMA model: kseed's ModelSeeds.zo_step against MeZO's loop.

    python bench/bench_gpu_zo_step.py               # H100 / H200: LLaMA-shaped 1.1B, bf16, 1 x 512 tokens
    python bench/bench_gpu_zo_step.py --smoke       # CPU syntax check: a tiny LLaMA, a few steps

The model is transformers' LlamaForCausalLM built from a config (random init, nothing downloaded).  A
step is two forwards (loss at w + eps z and at w - eps z) plus the perturbations and the update:
- MeZO: four passes over the weights, each regenerating z per tensor with torch.manual_seed(seed) and
  torch.normal (+eps, -2 eps, +eps to restore, then -lr g);
- kseed: ModelSeeds.zo_step, fused passes through apply_seeds_multi_ (three passes per step; with
  next_seed the restore, update and next step's +eps share one pass: two per step).
Reported: median step time over --steps steps after --warmup steps, and peak CUDA memory during them.
Each noise family of --noises gets the kseed rows (Rademacher: "kseed <backend> rad ..."), through
ModelSeeds(..., noise=...); a ModelSeeds without that keyword skips the Rademacher rows with a note.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import kseed_kernels as kk  # noqa: E402
from _baseline import mezo_step  # noqa: E402
from _llama_shapes import LLAMA_1B, LLAMA_TINY  # noqa: E402


def build_model(cfg: dict, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                         num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                         num_key_value_heads=cfg["kv_heads"], vocab_size=cfg["vocab"],
                         tie_word_embeddings=cfg["tie_embeddings"], max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).eval()
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(name, step, steps, warmup, device):
    for i in range(warmup):
        step(i)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup, warmup + steps):
        t0 = time.perf_counter()
        step(i)
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    med = statistics.median(times)
    print(f"  {name}: {med * 1e3:.1f} ms/step", flush=True)
    return name, med, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--backends", default=None)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--noises", default="gaussian,rademacher",
                    help="comma-separated noise families of the kseed rows")
    args = ap.parse_args()
    try:
        from kseed_kernels.model import ModelSeeds
    except ImportError as exc:
        sys.exit(f"kseed_kernels.model.ModelSeeds is not available: {exc}")
    if args.smoke:
        device, cfg, dtype = torch.device("cpu"), LLAMA_TINY, torch.float32
        tokens, steps = min(args.tokens, 32), args.steps or 2
        default_backends = [b for b in ("cpu", "triton") if b in kk.backends()]
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU: run with --smoke for a CPU syntax check")
        device, cfg, dtype = torch.device("cuda"), LLAMA_1B, torch.bfloat16
        tokens, steps = args.tokens, args.steps or 10
        default_backends = [b for b in ("cuda", "triton") if b in kk.backends()]
    backends = args.backends.split(",") if args.backends else default_backends
    noises = args.noises.split(",")
    for nz in noises:
        if nz not in kk.ops.NOISES:
            sys.exit(f"--noises: unknown family {nz!r}; choose from {', '.join(kk.ops.NOISES)}")

    def model_seeds(b, nz):
        """ModelSeeds for backend b and family nz (None if this ModelSeeds has no noise keyword)."""
        if nz == "gaussian":
            return ModelSeeds(model, backend=b)
        try:
            return ModelSeeds(model, backend=b, noise=nz)
        except TypeError as exc:
            print(f"  skipped the {nz} rows: ModelSeeds does not take noise= ({exc})", flush=True)
            return None

    model = build_model(cfg, dtype, device)
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    ids = torch.randint(0, cfg["vocab"], (1, tokens), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))

    @torch.no_grad()
    def loss_fn():
        return model(input_ids=ids, labels=ids).loss

    model_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; "
          f"{len(params)} tensors, {n:,} parameters, {dtype}, batch 1 x {tokens} tokens", flush=True)

    rows = []
    with torch.no_grad():
        rows.append(run("MeZO loop (4 passes)",
                        lambda i: mezo_step(params, 1000 + i, loss_fn, args.eps, args.lr),
                        steps, args.warmup, device))
        for b in backends:
            for nz in noises:
                tag = b if nz == "gaussian" else f"{b} rad"
                ms = model_seeds(b, nz)
                if ms is None:
                    continue
                rows.append(run(f"kseed {tag} zo_step",
                                lambda i, ms=ms: ms.zo_step(1000 + i, loss_fn, eps=args.eps,
                                                            lr=args.lr),
                                steps, args.warmup, device))
                ms.restore_pending()
                ms2 = model_seeds(b, nz)
                rows.append(run(f"kseed {tag} zo_step+next",
                                lambda i, ms=ms2: ms.zo_step(1000 + i, loss_fn, eps=args.eps,
                                                             lr=args.lr, next_seed=1001 + i),
                                steps, args.warmup, device))
                ms2.restore_pending()

        fwd = run("two forwards only", lambda i: (float(loss_fn()), float(loss_fn())), steps, 1,
                  device)
    base = rows[0][1]
    print()
    print(f"{'method':28} {'ms/step':>9} {'x MeZO':>7} {'peak GiB':>9} {'peak-model MiB':>15}")
    for name, t, peak in rows + [fwd]:
        pk = f"{peak / 2**30:.3f}" if peak is not None else "-"
        pm = f"{(peak - model_bytes) / 2**20:.1f}" if peak is not None else "-"
        print(f"{name:28} {t * 1e3:>9.1f} {base / t:>7.2f} {pk:>9} {pm:>15}")
    print(f"median of {steps} steps after {args.warmup} warm-up steps; peak = "
          "torch.cuda.max_memory_allocated during the timed steps.")


if __name__ == "__main__":
    main()
