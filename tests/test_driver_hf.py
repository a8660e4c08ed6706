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


# ------------------------------------------------------------------------------ datasets sources
def _examples(n=240):
    from kseed import datasets as D
    return D.generate_embedded(n, seed=3)


def _cfg(data, **kw):
    from kseed.config import FedConfig
    base = dict(num_clients=4, clients_per_round=2, min_per_client=5, eval_size=8)
    return FedConfig(**{**base, "data": str(data), "dataset": "hf", **kw}).validate()


def _dolly_rows(ex):
    return [{"instruction": e["instruction"], "context": e["input"], "response": e["output"],
             "category": e["category"]} for e in ex]


def test_datasets_sources_give_the_same_examples_and_identity(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the `datasets` library is kseed[hf]")
    from kseed import datasets as D
    from kseed import task
    from kseed.config import FedConfig
    ex = _examples()
    dolly = tmp_path / "dolly.jsonl"
    dolly.write_text("".join(json.dumps(r) + "\n" for r in _dolly_rows(ex)))
    ref = FedConfig(num_clients=4, clients_per_round=2, min_per_client=5, eval_size=8,
                    data=str(dolly), dataset="dolly").validate()
    want = task.build_data(ref)
    want_id = task.data_identity(ref, want[0], want[1])["sha256"]

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(_dolly_rows(ex)),
                               "test": datasets.Dataset.from_list(_dolly_rows(ex[:3]))})
    dd.save_to_disk(str(tmp_path / "saved"))
    renamed = [{"q": e["instruction"], "ctx": e["input"], "a": e["output"], "topic": e["category"]}
               for e in ex]
    datasets.Dataset.from_list(renamed).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(renamed).to_csv(str(tmp_path / "d.csv"), index=False)
    (tmp_path / "d.json").write_text(json.dumps(renamed))
    cols = "instruction=q,input=ctx,output=a,category=topic"
    for data, columns in ((tmp_path / "saved", None), (tmp_path / "d.parquet", cols),
                          (tmp_path / "d.csv", cols), (tmp_path / "d.json", cols)):
        cfg = _cfg(data, columns=columns)
        got = task.build_data(cfg)
        assert got[0] == want[0] and got[1] == want[1], data
        assert task.data_identity(cfg, got[0], got[1])["sha256"] == want_id
    # Alpaca's names (no category): a random hold-out; the examples keep their fields
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{k: e[k] for k in ("instruction", "input", "output")} for e in ex]))
    parts, test, held = task.build_data(_cfg(alpaca))
    assert len(test) == 8 and sum(map(len, parts)) == len(ex) - 8 and "random" in held
    assert {e["category"] for e in test} == {D.NO_CATEGORY}


def test_datasets_source_errors_name_the_column_and_file(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the `datasets` library is kseed[hf]")
    from kseed import datasets as D
    p = tmp_path / "x.parquet"
    datasets.Dataset.from_list([{"instruction": "a", "answer": "b"}]).to_parquet(str(p))
    with pytest.raises(D.DataError, match=r"x\.parquet: no output column"):
        D.load_table(str(p))
    with pytest.raises(D.DataError, match=r"x\.parquet: no column 'reply'"):
        D.load_table(str(p), "output=reply")
    assert D.load_table(str(p), "output=answer") == [
        {"instruction": "a", "input": "", "output": "b", "category": D.NO_CATEGORY}]
    q = tmp_path / "typed.parquet"
    datasets.Dataset.from_list([{"instruction": "a", "output": 7}]).to_parquet(str(q))
    with pytest.raises(D.DataError, match=r"typed\.parquet: row 0: column 'output' .*string, got int"):
        D.load_table(str(q))
    e = tmp_path / "empty"
    datasets.Dataset.from_dict({"instruction": [], "output": []}).save_to_disk(str(e))
    with pytest.raises(D.DataError, match=r"empty.*no examples"):
        D.load_table(str(e))
    with pytest.raises(ValueError, match="unknown field 'answer'"):
        D.parse_columns("answer=x")


def test_data_by_hub_name_and_auto_detection(tmp_path, capsys, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="the `datasets` library is kseed[hf]")
    cache = tmp_path / "hub"
    repo = cache / "datasets--acme--instruct"
    snap = repo / "snapshots" / COMMIT / "data"
    snap.mkdir(parents=True)
    datasets.Dataset.from_list(_dolly_rows(_examples())).to_parquet(
        str(snap / "train-00000-of-00001.parquet"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    out = tmp_path / "run"
    rc, so, se = _run(capsys, *TINY, "--rounds", 1, "--data", "acme/instruct", "--out", out)
    assert rc == 0, se
    cfg = json.loads((out / "checkpoint.json").read_text())["server"]["config"]
    assert cfg["dataset"] == "hf" and cfg["data"] == str(snap.parent)
    rc, so, se = _run(capsys, *TINY, "--rounds", 1, "--data", "acme/other", "--out", tmp_path / "o")
    assert rc == 2 and "datasets--acme--other" in _error_line(se)
    assert "--repo-type dataset" in _error_line(se)


def test_datasets_sources_without_the_extra_name_it(tmp_path, monkeypatch):
    import builtins
    from kseed import datasets as D
    real = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    p = tmp_path / "d.csv"
    p.write_text("instruction,output\na,b\n")
    with pytest.raises(D.DataError, match=r"kseed\[hf\]"):
        D.load_table(str(p))
