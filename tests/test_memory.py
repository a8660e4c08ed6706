"""Issue #11: w0 and the round snapshot live in file-backed maps, and the model rebuilt from them is
bitwise the in-memory path's; issue #13 2.2: a model with a missing / unexpected / non-finite tensor is
refused; 9c: loading prints nothing."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import kseed_kernels as kk
from kseed import cli
from kseed import modeling as M
from kseed import weights as W
from kseed.client import FedKSeedClient
from kseed.config import FedConfig
from kseed.server import FedKSeedServer
from kseed.simulation import build_data, load_workspace

from bitwise import bits

BACKENDS = [b for b in ("reference", "cpu") if b in kk.backends()]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KSEED_CACHE", str(tmp_path / "kseed-cache"))


def _mapping_of(t: torch.Tensor) -> str:
    """The /proc/self/maps path of the mapping that holds t's data ('' for anonymous memory)."""
    addr = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= addr < hi:
                return parts[5].strip() if len(parts) > 5 else ""
    raise AssertionError("address not mapped")


def _make_model(path, *, seed=0, tie=False, shard=None):
    """A small random LLaMA (about 0.2M parameters) saved with the embedded model's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(M.EMBEDDED_DIR)
    cfg = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=600, tie_word_embeddings=tie,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, max_position_embeddings=256)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(path), **kw)
    tok.save_pretrained(str(path))
    return str(path)


def _workspace(path, dtype="fp32", **kw):
    model, tok = M.load_model(path, dtype)
    return M.Workspace(model, tok, identity={"hash": M.model_hash(model)}, **kw)


def _coefs(gen, k, zeros=True):
    c = (torch.randn(k, generator=gen) * 1e-3).numpy().astype(np.float32)
    if zeros:
        c[::4] = 0.0
    return c


def _legacy_rebuild(w0, ms, seeds, coefs):
    """The clone-based rebuild before issue #11: copy a private clone of w0, apply the nonzero terms."""
    nz = np.flatnonzero(coefs != 0)
    with torch.no_grad():
        for p, w in zip(ms.params, w0):
            p.copy_(w)
    ms.apply(np.asarray(seeds, dtype=np.uint64)[nz], coefs[nz].tolist())
    return [bits(p) for p in ms.params]


# ----------------------------------------------------------------------------------- where w0 is
def test_w0_maps_the_model_file_and_hash_is_unchanged():
    model, tok = M.load_model(M.EMBEDDED_DIR)
    ws = M.Workspace(model, tok)
    assert ws.w0_source == "model file"
    target = os.path.realpath(os.path.join(M.EMBEDDED_DIR, "model.safetensors"))
    for w, p in zip(ws.w0, ws.ms.params):
        assert _mapping_of(w) == target
        assert torch.equal(bits(w), bits(p))
    # model_hash hashes in place; its value is the pre-#11 definition's (old checkpoints resume)
    import hashlib
    h = hashlib.sha256()
    sd = model.state_dict()
    for name in sorted(sd):
        t = sd[name].detach().contiguous()
        h.update(name.encode() + b"\0" + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    assert M.model_hash(model) == h.hexdigest()


def test_sharded_untied_model_maps_every_shard(tmp_path):
    path = _make_model(tmp_path / "m", shard="100KB")
    assert len(W.weight_files(path)) > 1
    ws = _workspace(path)
    assert ws.w0_source == "model file"
    shards = {os.path.realpath(f) for f in W.weight_files(path)}
    assert {_mapping_of(w) for w in ws.w0} == shards


def test_other_dtype_goes_to_a_cache_file_written_once(tmp_path):
    path = _make_model(tmp_path / "m")
    ws = _workspace(path, "bf16")
    cache = ws.w0_source
    assert cache.startswith(os.environ["KSEED_CACHE"]) and cache.endswith("-bf16.safetensors")
    assert all(_mapping_of(w) == cache for w in ws.w0)
    assert all(torch.equal(bits(w), bits(p)) for w, p in zip(ws.w0, ws.ms.params))
    st = os.stat(cache)
    ws2 = _workspace(path, "bf16")  # mapped again, not rewritten
    assert ws2.w0_source == cache and os.stat(cache).st_ino == st.st_ino
    # a damaged cache file is found out against the loaded model and rewritten
    del ws, ws2
    header, start = W.read_header(cache)
    with open(cache, "r+b") as f:
        f.seek(start + 10)
        b = f.read(1)
        f.seek(start + 10)
        f.write(bytes([b[0] ^ 0x40]))
    ws3 = _workspace(path, "bf16")
    assert ws3.w0_source == cache and os.stat(cache).st_ino != st.st_ino
    assert all(torch.equal(bits(w), bits(p)) for w, p in zip(ws3.w0, ws3.ms.params))


def test_pickle_model_goes_to_the_cache_file(tmp_path):
    src = _make_model(tmp_path / "m")
    model, _ = M.load_model(src)
    d = tmp_path / "bin"
    shutil.copytree(src, d)
    os.unlink(d / "model.safetensors")
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, d / "pytorch_model.bin")
    ws = _workspace(str(d))
    assert ws.w0_source.endswith("-f32.safetensors")
    assert all(torch.equal(bits(w), bits(p)) for w, p in zip(ws.w0, ws.ms.params))


def test_in_memory_model_gets_an_unlinked_file(gen):
    lin = torch.nn.Linear(16, 8)
    ws = M.Workspace(lin, None)
    assert ws.w0_source == "temporary file"
    assert all(_mapping_of(w).endswith("(deleted)") for w in ws.w0)


# ------------------------------------------------------------------- bitwise equal rebuilds
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_rebuild_from_mapped_w0_equals_in_memory_path(tmp_path, gen, backend, dtype):
    path = _make_model(tmp_path / "m", seed=3)
    model, tok = M.load_model(path, dtype)
    legacy_w0 = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    ws = M.Workspace(model, tok, backend=backend, identity={"hash": M.model_hash(model)})
    if dtype == "fp32":
        assert ws.w0_source == "model file"
    else:
        assert ws.w0_source.endswith(f"-{dtype.replace('fp', 'f')}.safetensors")
    # the accelerator path on CPU: w0 copied into the parameters, then applied in place
    staged = _workspace(path, dtype, backend=backend, staged=True)
    seeds = [int(x) for x in torch.randint(0, 2**62, (24,), generator=gen)]
    for rnd in range(2):
        coefs = _coefs(gen, 24)
        want = _legacy_rebuild(legacy_w0, ws.ms, seeds, coefs)
        for w in (ws, staged):
            w.ms.perturb(7, 0.5)  # the weights are anything before a rebuild
            w.rebuild(np.array(seeds, dtype=np.uint64), coefs)
            assert all(torch.equal(bits(p), x) for p, x in zip(w.ms.params, want)), rnd
    assert ws.rebuilds == 2 and ws.rebuild_seconds > 0


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_out_of_place_op_is_used_on_the_same_device(gen, monkeypatch, backend):
    """The dispatch: one pass of kseed_kernels.apply_seeds_multi (the out-of-place op) when the bases
    are on the parameters' device, copy + in place when staged; both give the same bits."""
    import kseed_kernels.model as KM
    calls = []
    real = KM.apply_seeds_multi

    def counted(*a, **k):
        calls.append(len(a[0]))
        return real(*a, **k)

    monkeypatch.setattr(KM, "apply_seeds_multi", counted)
    params = [(f"t{i}", (torch.randn(n, generator=gen) * 0.1).to(dt))
              for i, (n, dt) in enumerate([(300, torch.float32), (70, torch.bfloat16)])]
    ms = kk.ModelSeeds(params, backend=backend)
    bases = [t.clone() for _, t in params]
    seeds, coefs = [11, 2**63 + 5], [1e-3, -2e-3]
    ms.apply_from(bases, seeds, coefs)
    assert calls == [2]
    a = [bits(p).clone() for p in ms.params]
    assert not all(torch.equal(x, bits(b)) for x, b in zip(a, bases))  # the update did something
    ms.perturb(3, 1.0)
    ms.apply_from(bases, seeds, coefs, staged=True)
    assert calls == [2]
    assert all(torch.equal(bits(p), x) for p, x in zip(ms.params, a))
    ms.apply_from(bases, [], [])  # K = 0: the bases themselves
    assert calls == [2] and all(torch.equal(bits(p), bits(b)) for p, b in zip(ms.params, bases))


def test_apply_from_and_discard_pending_arguments(gen):
    t = torch.randn(50, generator=gen)
    ms = kk.ModelSeeds([("w", t)])
    with pytest.raises(ValueError, match="one tensor per parameter"):
        ms.apply_from([], [1], [1.0])
    with pytest.raises(ValueError, match="bases\\[0\\] is torch.float16"):
        ms.apply_from([t.half()], [1], [1.0])
    with pytest.raises(ValueError, match="shares its storage"):
        ms.apply_from([t], [1], [1.0])
    with pytest.raises(ValueError, match="same length"):
        ms.apply_from([t.clone()], [1], [1.0, 2.0])
    with pytest.raises(TypeError):
        ms.apply_from(t, [1], [1.0])
    base = t.clone()
    ms.zo_step(5, lambda: float(t.sum()), eps=1e-3, lr=1e-4, next_seed=9)
    assert ms.pending == (9, 1e-3)
    ms.discard_pending()
    assert ms.pending is None
    ms.apply_from([base], [], [])
    assert torch.equal(bits(t), bits(base))


# ------------------------------------------------------------------------------ the snapshot
def test_round_snapshot_is_file_backed_and_shared_by_the_round():
    """Simulation: ONE computed rebuild per round; the server's evaluation and every sampled client
    start from bitwise the same model, and the snapshot is an unlinked file's pages."""
    cfg = FedConfig(rounds=2, num_clients=4, clients_per_round=3, num_seeds=24, local_steps=3,
                    embedded_examples=240, min_per_client=5, eval_size=8, seed=5).validate()
    parts, _, _ = build_data(cfg)
    ws = load_workspace(cfg, cache=True)
    server = FedKSeedServer(cfg, base_identity=ws.identity)
    seen = []
    inner = ws.rebuild

    def rebuild(seeds, coefs):
        inner(seeds, coefs)
        seen.append(tuple(hash(bits(p).numpy().tobytes()) for p in ws.ms.params))

    ws.rebuild = rebuild
    clients = {c: FedKSeedClient(cfg, lambda: ws, parts[c], client_id=c) for c in range(4)}
    for rnd in (1, 2):
        seen.clear()
        before = ws.rebuilds
        ws.rebuild(server.seeds, server.global_coefs())  # the server's evaluation of the last round
        ids = server.sample_clients(rnd)
        server.aggregate(rnd, {c: clients[c].fit(server.make_down(rnd, c)) for c in ids})
        assert ws.rebuilds - before == 1
        assert len(seen) == 1 + len(ids) and len(set(seen)) == 1, rnd
    assert np.count_nonzero(server.global_coefs())
    assert all(_mapping_of(s).endswith("(deleted)") for s in ws._snapshot.tensors)


def test_staged_rebuild_with_snapshot_equals_direct(gen):
    """The accelerator layout on CPU: w0 copied in per tensor, the snapshot restored by copy."""
    a = _workspace(M.EMBEDDED_DIR, cache=True)
    b = _workspace(M.EMBEDDED_DIR, cache=True, staged=True)
    seeds = np.array([int(x) for x in torch.randint(0, 2**62, (16,), generator=gen)], dtype=np.uint64)
    coefs = _coefs(gen, 16)
    for ws in (a, b):
        ws.rebuild(seeds, coefs)
        ws.ms.perturb(1, 1.0)
        ws.rebuild(seeds, coefs)  # from the snapshot
        assert ws.rebuilds == 1
    assert all(torch.equal(bits(p), bits(q)) for p, q in zip(a.ms.params, b.ms.params))


# --------------------------------------------------------------------------- refused models
def _damaged(tmp_path, edit):
    from safetensors.torch import load_file, save_file
    d = tmp_path / "bad"
    shutil.copytree(M.EMBEDDED_DIR, d)
    sd = load_file(str(d / "model.safetensors"))
    edit(sd)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return str(d)


@pytest.mark.parametrize("edit,msg", [
    (lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"),
     "lack tensors the model needs: model.layers.1.mlp.up_proj.weight"),
    (lambda sd: sd.__setitem__("model.extra.weight", torch.zeros(3)),
     "hold tensors the model does not use: model.extra.weight"),
    (lambda sd: sd["model.layers.0.self_attn.q_proj.weight"].view(-1).__setitem__(17, float("nan")),
     "NaN or infinite values \\(tensor model.layers.0.self_attn.q_proj.weight\\)"),
    (lambda sd: sd["model.norm.weight"].__setitem__(0, float("inf")),
     "NaN or infinite values \\(tensor model.norm.weight\\)"),
])
def test_bad_model_refused(tmp_path, capsys, edit, msg):
    d = _damaged(tmp_path, edit)
    with pytest.raises(M.ModelError, match=msg):
        M.load_model(d)
    out = tmp_path / "run"
    rc = cli.main(["--model", d, "--rounds", "1", "--num-clients", "2", "--clients-per-round", "1",
                   "--local-steps", "1", "-K", "4", "--embedded-examples", "40", "--min-per-client",
                   "2", "--eval-size", "2", "--rouge-size", "0", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("kseed-fed: error: "), err
    assert not os.path.exists(out / "checkpoint.json")


def test_loading_prints_nothing(capfd):
    capfd.readouterr()
    M.load_model(M.EMBEDDED_DIR, "bf16")
    cap = capfd.readouterr()
    assert cap.out == "" and cap.err == "", cap


def test_cache_file_header_is_valid_safetensors(tmp_path):
    from safetensors import safe_open
    path = _make_model(tmp_path / "m")
    ws = _workspace(path, "fp16")
    with safe_open(ws.w0_source, "pt") as f:
        assert set(f.keys()) == set(ws.ms.names)
        assert json.loads(json.dumps(f.metadata()))["format"] == W.CACHE_FORMAT
        for n, p in zip(ws.ms.names, ws.ms.params):
            assert torch.equal(bits(f.get_tensor(n)), bits(p))


def test_unwritable_cache_falls_back_to_memory_with_a_warning(tmp_path, monkeypatch, gen, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("KSEED_CACHE", str(blocker))
    path = _make_model(tmp_path / "m")
    model, tok = M.load_model(path, "bf16")
    legacy_w0 = [p.detach().clone() for p in model.parameters()]
    with caplog.at_level("WARNING", logger="kseed"):
        ws = M.Workspace(model, tok, cache=True)
        seeds = np.array([5, 6, 7], dtype=np.uint64)
        coefs = _coefs(gen, 3, zeros=False)
        want = _legacy_rebuild(legacy_w0, ws.ms, seeds, coefs)
        ws.rebuild(seeds, coefs)
        ws.ms.perturb(3, 1.0)
        ws.rebuild(seeds, coefs)
    assert ws.w0_source == "memory" and isinstance(ws._snapshot, W.MemoryBuffer)
    assert "w0 kept in private memory" in caplog.text and "snapshot kept in private memory" in caplog.text
    assert ws.rebuilds == 1 and all(torch.equal(bits(p), x) for p, x in zip(ws.ms.params, want))
