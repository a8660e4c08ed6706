"""Models and data as users have them (issue 21): ORG/NAME from the local Hugging Face cache,
`datasets` sources and column maps, --dtype auto, and TensorBoard event files.  No network: the hub
cache layouts and data sets are made in tmp_path."""
import json
import os
import shutil

import pytest

from kseed import cli
from kseed import modeling as M

from test_driver_cli import TINY, _error_line, _metrics, _run

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_model(cache, org="acme", name="tiny", commit=COMMIT, ref="main"):
    repo = cache / f"models--{org}--{name}"
    snap = repo / "snapshots" / commit
    shutil.copytree(M.EMBEDDED_DIR, snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snap


def test_model_by_hub_name_resolves_offline_and_resumes_by_path(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "hub"
    snap = _hub_model(cache)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    out = tmp_path / "run"
    rc, so, se = _run(capsys, *TINY, "--rounds", 1, "--model", "acme/tiny", "--out", out)
    assert rc == 0, se
    ck = json.loads((out / "checkpoint.json").read_text())
    cfg = ck["server"]["config"] if "server" in ck else ck["payload"]["server"]["config"]
    assert os.path.realpath(cfg["model"]) == os.path.realpath(snap)
    # the same model by path resumes; by name at the same revision too
    assert _run(capsys, "--out", out, "--resume", "--rounds", 2, "--model", snap, "--quiet")[0] == 0
    rc, so, se = _run(capsys, "--out", out, "--resume", "--rounds", 3, "--model", "acme/tiny",
                      "--quiet")
    assert rc == 0, se
    assert [r["round"] for r in _metrics(out)] == [0, 1, 2, 3]
    # export with the model by name
    rc, so, se = _run(capsys, "export", "--out", out, "--to", tmp_path / "hf", "--model", "acme/tiny")
    assert rc == 0, se
    # a revision by commit hash, and an unknown one
    rc, so, se = _run(capsys, *TINY, "--rounds", 1, "--model", "acme/tiny", "--revision", COMMIT,
                      "--out", tmp_path / "r2")
    assert rc == 0, se


def test_model_not_in_the_hub_cache_is_one_line_naming_where_and_how(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "hub"
    _hub_model(cache)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    rc, so, se = _run(capsys, *TINY, "--rounds", 1, "--model", "acme/absent", "--out", tmp_path / "a")
    line = _error_line(se)
    assert rc == 2 and len(se.strip().splitlines()) == 1
    assert str(cache / "models--acme--absent") in line and "download acme/absent" in line
    rc, so, se = _run(capsys, *TINY, "--rounds", 1, "--model", "acme/tiny", "--revision", "v2",
                      "--out", tmp_path / "b")
    assert rc == 2 and "revision v2" in _error_line(se)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_flower_run_config_model_by_hub_name(tmp_path, monkeypatch):
    from kseed.flower.runconfig import fed_config
    cache = tmp_path / "hub"
    snap = _hub_model(cache, ref="v1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    cfg = fed_config({"model": "acme/tiny", "revision": "v1"})
    assert os.path.realpath(cfg.model) == os.path.realpath(snap)
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        fed_config({"model": "acme/tiny"})  # no refs/main


# ------------------------------------------------------------------------------- TensorBoard
def test_tensorboard_event_file_holds_every_rounds_scalars(tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="TensorBoard is the kseed[tensorboard] extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, tb = tmp_path / "run", tmp_path / "tb"
    rc, so, se = _run(capsys, *TINY, "--rounds", 2, "--rouge-every", 1, "--out", out,
                      "--tensorboard", tb)
    assert rc == 0, se
    rows = _metrics(out)
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for key in ("eval_loss", "train_loss", "rouge_l", "bytes_up", "bytes_down", "seconds"):
        assert any(r.get(key) is not None for r in rows), key
        assert key in tags, (key, sorted(tags))
    for key in tags:
        got = {e.step: e.value for e in acc.Scalars(key)}
        want = {r["round"]: float(r[key]) for r in rows if isinstance(r.get(key), (int, float))
                and not isinstance(r.get(key), bool)}
        assert got == pytest.approx(want, rel=1e-6), key


def test_tensorboard_without_the_extra_names_it(tmp_path, capsys, monkeypatch):
    import builtins
    real = builtins.__import__

    def no_tb(name, *a, **k):
        if name.startswith(("torch.utils.tensorboard", "tensorboard")):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tb)
    rc, so, se = _run(capsys, *TINY, "--rounds", 1, "--out", tmp_path / "r", "--tensorboard",
                      tmp_path / "tb")
    assert rc == 2 and "kseed[tensorboard]" in _error_line(se)
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------- --dtype auto
def _bf16_model(d):
    import torch
    m, tok = M.load_model(M.EMBEDDED_DIR)
    m.to(torch.bfloat16).save_pretrained(str(d), safe_serialization=True)
    tok.save_pretrained(str(d))
    return d


def test_dtype_auto_is_the_checkpoints_own_and_export_keeps_it(tmp_path, capsys):
    from kseed import task
    from kseed import weights as W
    from kseed.config import FedConfig
    mdir = _bf16_model(tmp_path / "bf16")
    assert task.checkpoint_dtype(str(mdir)) == "bf16"
    conf = json.loads((mdir / "config.json").read_text())
    conf.pop("dtype", None), conf.pop("torch_dtype", None)
    (mdir / "config.json").write_text(json.dumps(conf))  # no dtype in config.json: the tensors'
    assert task.checkpoint_dtype(str(mdir)) == "bf16"
    assert task.checkpoint_dtype(M.EMBEDDED_DIR) == "fp32"
    emb = task.resolve_dtype(FedConfig())
    assert (emb.dtype, emb.rounding) == ("fp32", "nearest")  # the embedded default as before
    assert task.resolve_dtype(FedConfig(dtype="fp16")).rounding == "stochastic"
    assert task.resolve_dtype(FedConfig(dtype="bf16", rounding="nearest")).rounding == "nearest"

    out = tmp_path / "run"
    rc, so, se = _run(capsys, *TINY, "--rounds", 1, "--model", mdir, "--out", out)
    assert rc == 0, se
    cfg = json.loads((out / "checkpoint.json").read_text())["server"]["config"]
    assert (cfg["dtype"], cfg["rounding"]) == ("bf16", "stochastic")
    # resuming with --dtype auto or bf16 is the same run; fp32 is another
    assert _run(capsys, "--out", out, "--resume", "--rounds", 2, "--dtype", "auto", "--quiet")[0] == 0
    rc, so, se = _run(capsys, "--out", out, "--resume", "--rounds", 3, "--dtype", "fp32", "--quiet")
    assert rc == 2 and "dtype" in _error_line(se)
    rc, so, se = _run(capsys, "export", "--out", out, "--to", tmp_path / "hf")
    assert rc == 0, se
    header, _ = W.read_header(str(tmp_path / "hf" / "model.safetensors"))
    assert {e["dtype"] for n, e in header.items() if n != "__metadata__"} == {"BF16"}
    # an explicit --dtype fp32 still trains the 16-bit checkpoint in fp32
    rc, so, se = _run(capsys, *TINY, "--rounds", 1, "--model", mdir, "--dtype", "fp32", "--out",
                      tmp_path / "f")
    cfg = json.loads((tmp_path / "f" / "checkpoint.json").read_text())["server"]["config"]
    assert rc == 0 and (cfg["dtype"], cfg["rounding"]) == ("fp32", "nearest")
