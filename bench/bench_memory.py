"""Memory and speed at real scale (issue #11): a 0.60B-parameter LLaMA-shaped model, built locally.

    python bench/bench_memory.py [--cache DIR] [--only CASES] [--json FILE] [--smoke]

The model (hidden 1536, intermediate 4096, 20 layers, 12 heads, 4 KV heads, vocab 32000, untied, fp32,
random init: 601,683,456 parameters, 2.24 GiB) is built once into DIR/model (default
~/.cache/kseed-bench), with the embedded model's tokenizer (its vocabulary is smaller than the model's:
the extra rows are never used) and a Dolly-style jsonl of 640 synthetic examples in 8 categories
(DIR/dolly.jsonl).  Nothing is downloaded.  The kseed cache (w0 in another dtype) goes to DIR/kseed-cache
(KSEED_CACHE), emptied at the start so that the first run of each dtype writes it.

Cases (--only, comma-separated; default all, one at a time, each in its own process):
  load-fp32, load-bf16  kseed.modeling.load_model alone
  sim-fp32, sim-bf16, sim-fp16
                        kseed-fed (python -m kseed), 1 round: --num-clients 20 --clients-per-round 2
                        --local-steps 3 -K 1024 --batch-size 1 --eval-size 4 --rouge-size 0 --threads 2
  client-fp32           one Flower ClientApp-style fit: kseed.flower.driver.run_client (load, rebuild
                        from a down message with nonzero coefficients, tau = 3 steps)
  sim-bf16ckpt          the sim case on a bf16 checkpoint (a bf16 copy of the model, DIR/model-bf16,
                        made once from the fp32 file) with --dtype auto (issue #21): the run's dtype is the
                        checkpoint's, so w0 is mapped from the file itself (no cast copy in KSEED_CACHE)
  ferret-fp32           one Ferret client fit (kseed.methods.ferret, issue #19): load, tau = 2 SGD steps
                        (batch 1, --max-length 64), project delta onto K = 16 seeds per group at most;
                        training-level memory (weights + gradients + the delta copy), not under the
                        issue #11 bound
  ferret-adamw          the same with --optimizer adamw (+ its two moment buffers)
  fedit-fp32            one LoRA client fit, client side only (issue #20; the server's down message is
                        made first, unmeasured): peft LoRA rank 8 on every q/k/v/o (FedIT's adapter),
                        tau = 2 AdamW steps (batch 1, --max-length 64), by FedPipe's client with its
                        plan set to (fp32, 8): it loads the fp32 workspace as a Flower client does
  fedit-int8, fedit-int4
                        the same fit on a frozen base quantized as a FedPipe client's (kseed.methods.
                        fedpipe.quantized_model: bitsandbytes int8 / NF4, streamed into a skeleton):
                        the client never loads the full-precision model
  timings               in one process, 2 threads, a 1 x 96-token batch: one forward pass, one kseed ZO
                        step (ModelSeeds.zo_step), the reference code's step (4 passes of
                        torch.manual_seed + torch.normal per tensor), the rebuild rate
For every process case the peak of RssAnon + RssShmem over the process and its children is sampled from
/proc every 10 ms (page cache, i.e. RssFile, does not count) and compared with the issue's bound
1.3 x weight bytes (in the run dtype) + 0.6 GiB; the peaks of RssFile alone and of the PSS (all that the
process holds resident, its mapped files and shared libraries included, a page mapped twice counted
once: /proc/PID/smaps_rollup) are recorded too.  The table is printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GIB = float(1 << 30)
MODEL = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=20, num_attention_heads=12,
             num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
SMOKE_MODEL = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=False)
CATEGORIES = ["brainstorming", "classification", "closed_qa", "creative_writing", "general_qa",
              "information_extraction", "open_qa", "summarization"]
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "bf16ckpt": 2, "adamw": 4}
SIM_ARGS = ["--num-clients", "20", "--clients-per-round", "2", "--local-steps", "3", "-K", "1024",
            "--rounds", "1", "--batch-size", "1", "--eval-size", "4", "--rouge-size", "0",
            "--threads", "2", "--quiet"]
ALL_CASES = ["load-fp32", "load-bf16", "sim-fp32", "sim-bf16", "sim-fp16", "client-fp32", "timings",
             "ferret-fp32", "ferret-adamw", "sim-bf16ckpt", "fedit-fp32", "fedit-int8", "fedit-int4"]


# ------------------------------------------------------------------------------ the model
def model_dir(cache: str) -> str:
    return os.path.join(cache, "model")


def build(cache: str, smoke: bool) -> None:
    """Build the model, its tokenizer and the data once (a marker file records the configuration)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = dict(SMOKE_MODEL if smoke else MODEL)
    d = model_dir(cache)
    marker = os.path.join(cache, "built.json")
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == spec:
                return
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(cache, exist_ok=True)
    emb = os.path.join(ROOT, "python", "kseed", "data", "embedded")
    tok = AutoTokenizer.from_pretrained(emb, local_files_only=True)
    cfg = LlamaConfig(**spec, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    del model
    words = ("river stone light garden paper engine window market letter music forest planet "
             "signal bridge number story winter glass orbit table").split()
    import random
    rng = random.Random(0)
    with open(os.path.join(cache, "dolly.jsonl"), "w", encoding="utf-8") as f:
        for i in range(640):
            text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
            f.write(json.dumps({"instruction": text(12), "context": text(rng.randint(0, 20)),
                                "response": text(rng.randint(8, 30)),
                                "category": CATEGORIES[i % len(CATEGORIES)]}) + "\n")
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(spec, f)


# --------------------------------------------------------------------------------- sampling
def _children(pid: int):
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def _status(pid: int) -> dict:
    vals = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("RssAnon", "RssShmem", "RssFile"):
                    vals[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return vals


def _pss(pid: int) -> int:
    """Proportional set size in bytes (/proc/PID/smaps_rollup): every resident page the process maps,
    file pages included, each divided by the number of mappings that share it, so that a page mapped
    twice (the model's file and w0 from the same file) counts once; 0 where unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_sampled(cmd, env=None, timeout=3000):
    """Run cmd; sample the process tree's RssAnon + RssShmem every 10 ms. Returns a dict."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"anon_shmem": 0, "anon": 0, "shmem": 0, "file": 0, "pss": 0}
    import threading
    out = []
    th = threading.Thread(target=lambda: out.append(p.stdout.read()), daemon=True)
    th.start()
    while p.poll() is None:
        tot = {"RssAnon": 0, "RssShmem": 0, "RssFile": 0, "Pss": 0}
        todo, seen = [p.pid], set()
        while todo:
            q = todo.pop()
            if q in seen:
                continue
            seen.add(q)
            for k, v in _status(q).items():
                tot[k] += v
            tot["Pss"] += _pss(q)
            todo += _children(q)
        a = tot["RssAnon"] + tot["RssShmem"]
        if a > peak["anon_shmem"]:
            peak.update(anon_shmem=a, anon=tot["RssAnon"], shmem=tot["RssShmem"])
        peak["file"] = max(peak["file"], tot["RssFile"])
        peak["pss"] = max(peak["pss"], tot["Pss"])
        if time.perf_counter() - t0 > timeout:
            p.kill()
        time.sleep(0.01)
    th.join()
    return {"rc": p.returncode, "seconds": time.perf_counter() - t0, "peak": peak,
            "output": out[0] if out else ""}


# ---------------------------------------------------------------------------- the workers
def build_bf16(cache: str) -> str:
    """A bf16 copy of the model (DIR/model-bf16, config dtype bfloat16), made once, tensor by tensor."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, d = model_dir(cache), os.path.join(cache, "model-bf16")
    st = os.path.join(d, "model.safetensors")
    if os.path.isfile(st) and os.path.getmtime(st) >= os.path.getmtime(os.path.join(src, "model.safetensors")):
        return d
    os.makedirs(d, exist_ok=True)
    for name in os.listdir(src):
        if name != "model.safetensors":
            shutil.copyfile(os.path.join(src, name), os.path.join(d, name))
    with open(os.path.join(d, "config.json"), encoding="utf-8") as f:
        conf = json.load(f)
    conf["dtype"] = "bfloat16"
    conf.pop("torch_dtype", None)
    with open(os.path.join(d, "config.json"), "w", encoding="utf-8") as f:
        json.dump(conf, f, indent=2)
    with safe_open(os.path.join(src, "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k).to(torch.bfloat16) for k in f.keys()}
        meta = f.metadata()
    save_file(tensors, st + ".tmp", metadata=meta)
    os.replace(st + ".tmp", st)
    return d


def worker_load(cache: str, dtype: str) -> None:
    from kseed import modeling as M
    t = time.perf_counter()
    model, _ = M.load_model(model_dir(cache), dtype)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"parameters": n, "load_s": time.perf_counter() - t}))


def worker_client(cache: str, dtype: str) -> None:
    """What a Flower ClientApp does for one fit message (kseed.flower.driver.run_client)."""
    import numpy as np

    from kseed import protocol as P
    from kseed.config import FedConfig
    from kseed.flower.driver import run_client
    from kseed.flower.runconfig import default_run_config, key_of
    from kseed.server import FedKSeedServer

    import torch
    torch.set_num_threads(2)
    rc = default_run_config()
    over = {"model": model_dir(cache), "data": os.path.join(cache, "dolly.jsonl"),
            "dataset": "dolly", "num_clients": 20, "clients_per_round": 2, "local_steps": 3,
            "num_seeds": 1024, "batch_size": 1, "eval_size": 4, "rouge_size": 0, "dtype": dtype}
    for k, v in over.items():
        rc[key_of(k)] = v
    cfg = FedConfig(**{k: v for k, v in over.items()}).validate()
    server = FedKSeedServer(cfg)
    # Round 1 with two synthetic uploads, so that round 2's down message has nonzero coefficients.
    ids = server.sample_clients(1)
    ups = {c: P.encode_up(P.UpMessage(round=1, client_id=c, num_examples=10,
                                      indices=np.array([3 + c, 100 + c, 900], dtype=np.uint32),
                                      grads=np.array([0.5, -1.0, 2.0], dtype=np.float32),
                                      train_loss=5.0), k=cfg.num_seeds) for c in ids}
    server.aggregate(1, ups)
    cid = server.sample_clients(2)[0]
    down = server.make_down(2, cid)
    up, timing = run_client(rc, cid, cfg.num_clients, down)
    print(json.dumps({"up_bytes": len(up), "nonzero_coefs": int(np.count_nonzero(
        server.global_coefs())), **{k: round(v, 3) for k, v in timing.items()}}))


def worker_ferret(cache: str, dtype: str) -> None:
    """One Ferret client fit, from the server's round-1 down message (dtype "adamw": fp32, AdamW)."""
    import torch

    from kseed.config import FedConfig
    from kseed.methods import ferret as FR
    from kseed.task import build_data, load_workspace

    torch.set_num_threads(2)
    cfg = FedConfig(method="ferret", model=model_dir(cache), data=os.path.join(cache, "dolly.jsonl"),
                    dataset="dolly", num_clients=20, clients_per_round=2, local_steps=2,
                    num_seeds=16, batch_size=1, max_length=64, eval_size=4, rouge_size=0,
                    dtype="fp32" if dtype == "adamw" else dtype,
                    optimizer="adamw" if dtype == "adamw" else "sgd", lr=1e-4).validate()
    parts, _, _ = build_data(cfg)
    ws = load_workspace(cfg, cache=False)
    server = FR.FerretServer(cfg, base_identity=ws.identity)
    cid = server.sample_clients(1)[0]
    client = FR.FerretClient(cfg, lambda: ws, parts[cid], client_id=cid)
    t = time.perf_counter()
    up = client.fit(server.make_down(1, cid))
    st = client.last_stats
    print(json.dumps({"up_bytes": len(up), "fit_s": round(time.perf_counter() - t, 3),
                      "local_s": round(st["local_seconds"], 3),
                      "project_s": round(st["project_seconds"], 3),
                      "coefficients": st["coefficients"]}))


def _lora_config(cache: str):
    from kseed import methods
    from kseed.config import FedConfig
    return FedConfig(**methods.get("fedpipe").configure(dict(
        model=model_dir(cache), data=os.path.join(cache, "dolly.jsonl"), dataset="dolly",
        num_clients=20, clients_per_round=2, local_steps=2, batch_size=1, max_length=64,
        eval_size=4, rouge_size=0, dtype="fp32", lora_rank=8, select_fraction=1.0,
        calib_size=4))).validate()


def _lora_down(cache: str) -> str:
    return os.path.join(cache, "lora-down.bin")


def worker_lora_down(cache: str) -> None:
    """The server side of the fedit-* cases, run unsampled before them: a FedPipe server on every
    q/k/v/o target (--select-fraction 1, so its adapter is FedIT's) at rank 8, its round-1 down
    message for the first sampled client written to DIR/lora-down.bin with that client's id."""
    import torch

    from kseed.methods import fedpipe as FPM
    from kseed.rundir import atomic_write
    from kseed.task import load_workspace

    torch.set_num_threads(2)
    cfg = _lora_config(cache)
    ws = load_workspace(cfg, cache=False)
    server = FPM.FedPipeServer(cfg, base_identity=ws.identity)
    cid = server.sample_clients(1)[0]
    atomic_write(_lora_down(cache), cid.to_bytes(4, "little") + server.make_down(1, cid))


def worker_fedit(cache: str, dtype: str) -> None:
    """One LoRA client fit at rank 8 on the fp32, int8 or NF4 frozen base, client side only (the
    down message comes from worker_lora_down): FedPipe's client (kseed.methods.fedpipe) with its
    plan set to (bits, 8), which on fp32 is FedIT's client (it loads the workspace as a Flower client
    does, without the server's facts) and on int8 / NF4 streams the quantized base and never loads
    the full-precision model (its loader would raise)."""
    import torch

    from kseed.methods import fedpipe as FPM
    from kseed.task import build_data, load_workspace

    torch.set_num_threads(2)
    bits = {"int8": 8, "int4": 4}.get(dtype, 32)
    cfg = _lora_config(cache)
    with open(_lora_down(cache), "rb") as f:
        raw = f.read()
    cid, down = int.from_bytes(raw[:4], "little"), raw[4:]
    parts, _, _ = build_data(cfg)
    loads = []

    def loader():
        if bits != 32:
            raise RuntimeError("a quantized client loaded the full-precision model")
        loads.append(1)
        return load_workspace(cfg, cache=False, facts=False)
    client = FPM.FedPipeClient(cfg, loader, parts[cid], client_id=cid)
    client._plan = (bits, 8)  # the three cases differ only in the frozen base
    t = time.perf_counter()
    up = client.fit(down)
    print(json.dumps({"down_bytes": len(down), "up_bytes": len(up), "base_bits": bits,
                      "workspace_loads": len(loads), "fit_s": round(time.perf_counter() - t, 3),
                      "train_loss": client.last_stats["train_loss"]}))


def worker_timings(cache: str, reps: int) -> None:
    import numpy as np
    import torch

    from _baseline import mezo_step
    from kseed import modeling as M
    from kseed_kernels import ModelSeeds

    torch.set_num_threads(2)
    model, tok = M.load_model(model_dir(cache), "fp32")
    ms = ModelSeeds(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, min(len(tok), model.config.vocab_size), (1, 96), generator=g)
    labels = ids.clone()
    labels[:, :32] = -100
    batch = (ids, torch.ones_like(ids), labels)
    loss = lambda: M.batch_loss(model, batch)  # noqa: E731
    params = list(ms.params)
    eps, lr = 1e-3, 1e-6

    def timed(fn, n):
        out = []
        for i in range(n):
            t = time.perf_counter()
            fn(i)
            out.append(time.perf_counter() - t)
        return statistics.median(out)

    def rebuild_rate(m, k, first_seed, stride, rng):
        """Element-seed updates per second of m.apply with k seeds (a fresh set each repetition)."""
        seeds = np.arange(first_seed, first_seed + k, dtype=np.uint64)
        coefs = (np.random.default_rng(rng).standard_normal(k) * 1e-4).tolist()
        return m.numel * k / timed(lambda i: m.apply(seeds + np.uint64(stride * i), coefs), reps)

    res = {"load_avg_start": os.getloadavg()[0]}
    loss()  # warm-up
    res["forward_s"] = timed(lambda i: loss(), reps)
    res["kseed_step_s"] = timed(lambda i: ms.zo_step(1000 + i, loss, eps=eps, lr=lr), reps)
    res["reference_step_s"] = timed(lambda i: mezo_step(params, 2000 + i, loss, eps, lr), reps)
    res["rebuild_k"] = 16
    res["rebuild_rate"] = rebuild_rate(ms, 16, 5000, 100, 0)
    res["rebuild_k4096_s"] = ms.numel * 4096 / res["rebuild_rate"]
    # the Rademacher family (issue 12): its ZO step (the perturbation's share of a step is what is left
    # after the two forward passes) and its rebuild rate, at a K that fills its several-seed passes
    msr = ModelSeeds(model, noise="rademacher")
    res["kseed_step_rademacher_s"] = timed(lambda i: msr.zo_step(3000 + i, loss, eps=eps, lr=lr), reps)
    res["rebuild_rademacher_k"] = 256
    res["rebuild_rademacher_rate"] = rebuild_rate(msr, 256, 7000, 1000, 1)
    res["rebuild_rademacher_k4096_s"] = msr.numel * 4096 / res["rebuild_rademacher_rate"]
    res["parameters"] = ms.numel
    res["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(res))


# ----------------------------------------------------------------------------------- driver
def _last_json(text: str):
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                pass
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "kseed-bench"))
    ap.add_argument("--only", default=",".join(ALL_CASES))
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (medians)")
    ap.add_argument("--smoke", action="store_true", help="a tiny model: checks the plumbing only")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    cache = os.path.abspath(a.cache + ("-smoke" if a.smoke else ""))
    if a.worker:
        kind = a.worker[0]
        if kind == "build":
            build(cache, a.smoke)
        elif kind == "build-bf16":
            build_bf16(cache)
        elif kind == "load":
            worker_load(cache, a.worker[1])
        elif kind == "client":
            worker_client(cache, a.worker[1])
        elif kind == "timings":
            worker_timings(cache, a.reps)
        elif kind == "ferret":
            worker_ferret(cache, a.worker[1])
        elif kind == "fedit":
            worker_fedit(cache, a.worker[1])
        elif kind == "lora-down":
            worker_lora_down(cache)
        return 0
    cases = [c for c in a.only.split(",") if c]
    bad = [c for c in cases if c not in ALL_CASES]
    if bad:
        ap.error(f"unknown case(s) {bad}; choose from {ALL_CASES}")
    me = [sys.executable, os.path.abspath(__file__), "--cache", a.cache, "--reps", str(a.reps)] + \
        (["--smoke"] if a.smoke else [])
    r = subprocess.run(me + ["--worker", "build"], capture_output=True, text=True)
    if r.returncode:
        print(r.stdout, r.stderr)
        return 1
    kcache = os.path.join(cache, "kseed-cache")
    shutil.rmtree(kcache, ignore_errors=True)
    env = dict(os.environ, KSEED_CACHE=kcache, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    import kseed
    from safetensors import safe_open
    n = 0
    with safe_open(os.path.join(model_dir(cache), "model.safetensors"), "np") as f:
        for k in f.keys():
            n += int(__import__("numpy").prod(f.get_slice(k).get_shape()))
    head = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "parameters": n,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                       f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB",
            "kseed": os.path.dirname(kseed.__file__), "commit": subprocess.run(
                ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                text=True).stdout.strip()}
    print(json.dumps(head))
    results = []
    if any(c.startswith("fedit-") for c in cases):  # the server side of those cases, not measured
        r = subprocess.run(me + ["--worker", "lora-down"], capture_output=True, text=True, env=env)
        if r.returncode:
            print(r.stdout, r.stderr)
            return 1
    for case in cases:
        kind, _, dtype = case.partition("-")
        if kind == "sim":
            out = os.path.join(cache, "runs", dtype)
            shutil.rmtree(out, ignore_errors=True)
            mdir = model_dir(cache)
            if dtype == "bf16ckpt":
                r = subprocess.run(me + ["--worker", "build-bf16"], capture_output=True, text=True)
                if r.returncode:
                    print(r.stdout, r.stderr)
                    return 1
                mdir = os.path.join(cache, "model-bf16")
            cmd = [sys.executable, "-m", "kseed", "--model", mdir, "--data",
                   os.path.join(cache, "dolly.jsonl"), "--dataset", "dolly",
                   "--dtype", "auto" if dtype == "bf16ckpt" else dtype, "--out", out] + SIM_ARGS
        elif kind == "timings":
            cmd = me + ["--worker", "timings"]
        else:
            cmd = me + ["--worker", kind, dtype]
        r = run_sampled(cmd, env=env)
        info = _last_json(r["output"]) if kind != "sim" else None
        if kind == "sim" and r["rc"] == 0:
            with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
                s = json.load(f)
            info = {"eval_loss_last": s.get("eval_loss_last"), "seconds": s.get("seconds_this_process")}
            w0c = os.path.join(kcache, "w0")
            info["w0_cache_files"] = sorted(os.listdir(w0c)) if os.path.isdir(w0c) else []
        wbytes = n * DTYPE_BYTES.get(dtype or "fp32", 4)
        bound = 1.3 * wbytes + 0.6 * GIB
        row = {"case": case, "rc": r["rc"], "wall_s": round(r["seconds"], 1),
               "weights_gib": wbytes / GIB, "peak_gib": r["peak"]["anon_shmem"] / GIB,
               "peak_anon_gib": r["peak"]["anon"] / GIB, "peak_shmem_gib": r["peak"]["shmem"] / GIB,
               "peak_file_gib": r["peak"]["file"] / GIB, "peak_pss_gib": r["peak"]["pss"] / GIB,
               "bound_gib": bound / GIB,
               "x_weights": r["peak"]["anon_shmem"] / wbytes, "info": info}
        if r["rc"]:
            row["tail"] = r["output"][-2000:]
        results.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(f"machine: {head['machine']}; {head['parameters']:,} parameters; commit {head['commit']}; "
          f"{head['date_utc']} UTC")
    print(f"{'case':12} {'peak GiB':>9} {'x weights':>9} {'bound GiB':>9} {'ok':>4} {'wall s':>7}  "
          "notes")
    for row in results:
        if row["case"] == "timings":
            continue
        ok = "yes" if row["rc"] == 0 and row["peak_gib"] <= row["bound_gib"] else "NO"
        note = "" if row["rc"] == 0 else f"exit {row['rc']}"
        print(f"{row['case']:12} {row['peak_gib']:9.2f} {row['x_weights']:9.2f} {row['bound_gib']:9.2f} "
              f"{ok:>4} {row['wall_s']:7.1f}  anon {row['peak_anon_gib']:.2f} shmem "
              f"{row['peak_shmem_gib']:.2f} file(max) {row['peak_file_gib']:.2f} pss(max) "
              f"{row['peak_pss_gib']:.2f} {note}")
    for row in results:
        if row["case"] == "timings" and row["info"]:
            t = row["info"]
            print(f"timings (2 threads, 1 x 96 tokens, medians of {a.reps}; load avg "
                  f"{t['load_avg_start']:.1f} -> {t['load_avg_end']:.1f}): forward {t['forward_s']:.2f} s; "
                  f"kseed step {t['kseed_step_s']:.2f} s; reference step {t['reference_step_s']:.2f} s "
                  f"({t['reference_step_s'] / t['kseed_step_s']:.2f}x); rebuild "
                  f"{t['rebuild_rate'] / 1e9:.2f} G element-seed/s (K = {t['rebuild_k']}), full K = 4096 "
                  f"rebuild {t['rebuild_k4096_s'] / 60:.1f} min")
            if "kseed_step_rademacher_s" in t:
                share = lambda step: max(0.0, step - 2 * t["forward_s"]) / step  # noqa: E731
                print(f"  perturbation share of a step: gaussian {100 * share(t['kseed_step_s']):.0f} %, "
                      f"rademacher {100 * share(t['kseed_step_rademacher_s']):.0f} % (step "
                      f"{t['kseed_step_rademacher_s']:.2f} s); rademacher rebuild "
                      f"{t['rebuild_rademacher_rate'] / 1e9:.2f} G element-seed/s (K = "
                      f"{t['rebuild_rademacher_k']}), full K = 4096 rebuild "
                      f"{t['rebuild_rademacher_k4096_s'] / 60:.2f} min")
        elif row["case"] == "timings":
            print("timings: failed:", row.get("tail", ""))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"head": head, "results": results}, f, indent=1)
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
