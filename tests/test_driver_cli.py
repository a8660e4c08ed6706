"""kseed-fed end to end: outputs, resume (bitwise), export, Dolly / NI runs, and bad input."""
import json
import os
import shutil
import subprocess
import sys

import torch

from kseed import cli
from kseed import modeling as M

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures")
ROOT = os.path.dirname(HERE)
TINY = ["--num-clients", "4", "--clients-per-round", "2", "--local-steps", "4", "-K", "16",
        "--eval-size", "8", "--rouge-size", "2", "--max-new-tokens", "4",
        "--embedded-examples", "240", "--min-per-client", "5", "--batch-size", "2", "--quiet"]


def _run(capsys, *args):
    rc = cli.main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _metrics(d):
    with open(os.path.join(d, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _error_line(err):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kseed-fed: error: "), err
    return lines[0]


def test_help_lists_the_options():
    out = subprocess.run([sys.executable, "-m", "kseed", "--help"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT}/python"), timeout=120)
    assert out.returncode == 0
    for flag in ("--rounds", "--num-clients", "--clients-per-round", "--local-steps", "--num-seeds",
                 "-K", "--lr", "--eps", "--sampling", "--model", "--data", "--dataset", "--dtype",
                 "--device", "--seed", "--out", "--resume"):
        assert flag in out.stdout, flag
    assert out.stdout.count("default") >= 17 and "{uniform,pro}" in out.stdout


def test_end_to_end_outputs_and_export(tmp_path, capsys):
    out = tmp_path / "run"
    rc, so, se = _run(capsys, *TINY, "--rounds", 3, "--out", out, "--sampling", "pro")
    assert rc == 0, se
    assert "held-out loss" in so
    rows = _metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for r in rows[1:]:
        for key in ("train_loss", "eval_loss", "bytes_down", "bytes_up", "seconds"):
            assert key in r
        assert r["bytes_down"] == 2 * (64 + 2 * 4 * 16)  # coefficients + Pro probabilities
        assert r["bytes_up"] == sum(r["bytes_up_per_client"].values())
        assert r["bytes_up"] <= 2 * (32 + 4 * 6)
    for name in ("checkpoint.json", "loss.png", "bytes.png", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rouge_l"] is not None and 0 <= summary["rouge_l"] <= 1
    # export and reload with transformers
    hf = tmp_path / "hf"
    rc, so, se = _run(capsys, "export", "--out", out, "--to", hf)
    assert rc == 0, se
    assert (hf / "model.safetensors").exists()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(str(hf), local_files_only=True)
    AutoTokenizer.from_pretrained(str(hf), local_files_only=True)
    base, _ = M.load_model(M.EMBEDDED_DIR)
    diff = [not torch.equal(a, b) for a, b in zip(m.state_dict().values(), base.state_dict().values())]
    assert any(diff)  # trained
    # the exported weights give the last round's eval loss again
    from kseed.simulation import build_data, checkpoint_config
    cfg = checkpoint_config(str(out))
    _, ev, _ = build_data(cfg)
    from transformers import AutoTokenizer as AT
    tok = AT.from_pretrained(str(hf), local_files_only=True)
    loss = M.eval_loss(m, M.tokenize_examples(tok, ev, cfg.max_length, cfg.prompt_template()),
                       tok.pad_token_id, "cpu")
    assert loss == rows[-1]["eval_loss"]


def test_resume_is_bitwise_identical(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(capsys, *TINY, "--rounds", 4, "--out", a)[0] == 0
    assert _run(capsys, *TINY, "--rounds", 2, "--out", b)[0] == 0
    with open(b / "metrics.jsonl", "a") as f:  # a torn line from a crash after the checkpoint
        f.write('{"round": 3, "train_lo')
    rc, so, se = _run(capsys, "--out", b, "--resume", "--rounds", 4, "--quiet")
    assert rc == 0, se
    ra, rb = _metrics(a), _metrics(b)
    assert len(ra) == len(rb) == 5
    assert _strip(ra) == _strip(rb)
    ca = json.loads((a / "checkpoint.json").read_text())
    cb = json.loads((b / "checkpoint.json").read_text())
    assert ca["server"]["acc"] == cb["server"]["acc"]


def test_dolly_and_ni_runs(tmp_path, capsys):
    rc, so, se = _run(capsys, *TINY, "--rounds", 1, "--data", os.path.join(FIX, "dolly_small.jsonl"),
                      "--num-clients", 3, "--out", tmp_path / "dolly")
    assert rc == 0, se
    assert "(summarization)" in so
    rc, so, se = _run(capsys, "--rounds", 1, "--local-steps", 2, "-K", 8, "--eval-size", 4,
                      "--rouge-size", 1, "--max-new-tokens", 2, "--data", os.path.join(FIX, "ni"),
                      "--clients-per-round", 2, "--quiet", "--out", tmp_path / "ni")
    assert rc == 0, se
    cfg = json.loads((tmp_path / "ni" / "checkpoint.json").read_text())["server"]["config"]
    assert cfg["dataset"] == "ni" and cfg["num_clients"] == 3


def test_bad_input_one_line_errors_and_checkpoint_kept(tmp_path, capsys):
    good = tmp_path / "good"
    assert _run(capsys, *TINY, "--rounds", 1, "--out", good)[0] == 0
    ck = good / "checkpoint.json"
    before = ck.read_bytes()
    nomodel = tmp_path / "nomodel"
    nomodel.mkdir()
    shutil.copy(os.path.join(M.EMBEDDED_DIR, "config.json"), nomodel)
    bad_dolly = tmp_path / "bad.jsonl"
    bad_dolly.write_text("{oops\n")
    cases = [
        (["--data", tmp_path / "missing.jsonl"], "no such file"),
        (["--data", bad_dolly, "--dataset", "dolly"], "not valid JSON"),
        (["--model", nomodel], "no weights"),
        (["--num-clients", 2, "--clients-per-round", 3], "more than --num-clients"),
        ([], "already holds a checkpoint"),
        (["--resume", "--lr", 0.5], "differs from the checkpoint"),
        (["--resume", "--data", bad_dolly], "differs from the checkpoint"),
    ]
    fresh = tmp_path / "fresh"
    for extra, msg in cases:
        target = good if (not extra or "--resume" in extra) else fresh
        args = (TINY if "--resume" not in extra else ["--quiet"]) + ["--rounds", 2, "--out", target]
        rc, so, se = _run(capsys, *args, *extra)
        assert rc == 2, (extra, se)
        assert msg in _error_line(se), (extra, se)
        assert ck.read_bytes() == before, extra
        assert not (fresh / "checkpoint.json").exists()
    # a corrupt checkpoint
    ck.write_bytes(before.replace(b'"round": 1', b'"round": 7'))
    rc, so, se = _run(capsys, "--out", good, "--resume", "--quiet")
    assert rc == 2 and "checksum" in _error_line(se)
    ck.write_bytes(b"\x00garbage")
    rc, so, se = _run(capsys, "--out", good, "--resume", "--quiet")
    assert rc == 2 and "corrupt checkpoint" in _error_line(se)
    assert ck.read_bytes() == b"\x00garbage"
    rc, so, se = _run(capsys, "--out", tmp_path / "none", "--resume", "--quiet")
    assert rc == 2 and "no checkpoint" in _error_line(se)


def test_resume_with_a_different_base_model(tmp_path, capsys):
    mdir = tmp_path / "model"
    shutil.copytree(M.EMBEDDED_DIR, mdir)
    out = tmp_path / "run"
    assert _run(capsys, *TINY, "--rounds", 1, "--model", mdir, "--out", out)[0] == 0
    before = (out / "checkpoint.json").read_bytes()
    m, tok = M.load_model(str(mdir))
    with torch.no_grad():
        m.model.norm.weight.add_(0.01)
    m.save_pretrained(str(mdir), safe_serialization=True)
    rc, so, se = _run(capsys, "--out", out, "--resume", "--rounds", 2, "--quiet")
    assert rc == 2 and "another base model" in _error_line(se)
    assert (out / "checkpoint.json").read_bytes() == before
    rc, so, se = _run(capsys, "export", "--out", out, "--to", tmp_path / "hf")
    assert rc == 2 and "another base model" in _error_line(se)


def test_bad_config_values_refused_before_anything_is_written(tmp_path, capsys):
    """#13 section 2 item 3 and 7: every value is checked up front (one line, exit 2, no files)."""
    cases = [
        (["--lr", "nan"], "--lr must be finite"), (["--lr", "inf"], "--lr must be finite"),
        (["--lr", "-1"], "--lr must be > 0"), (["--lr", "0"], "--lr must be > 0"),
        (["--lr", "1e30"], "--lr must be <= 1"), (["--eps", "nan"], "--eps must be finite"),
        (["--pro-clip", "nan"], "--pro-clip must be finite"), (["--alpha", "nan"], "--alpha"),
        (["--eps", "-0.1"], "--eps must be > 0"), (["--norm-bound", "0.5"], "--norm-bound"),
        (["--lr-delta", "1.5"], "--lr-delta"), (["--g-clip", "nan"], "--g-clip"),
        (["--backend", "bogus"], "--backend 'bogus' is not usable here"),
        (["--device", "banana"], "--device 'banana' is not a torch device"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no usable CUDA device"))
    for i, (extra, msg) in enumerate(cases):
        out = tmp_path / f"r{i}"
        rc, so, se = _run(capsys, *TINY, "--rounds", 1, "--out", out, *extra)
        assert rc == 2, (extra, se)
        assert msg in _error_line(se), (extra, se)
        assert not out.exists(), extra
    rc, so, se = _run(capsys, "export", "--out", tmp_path / "x", "--to", tmp_path / "y",
                      "--device", "banana")
    assert rc == 2 and "not a torch device" in _error_line(se)


def test_export_refuses_the_base_model_and_weights(tmp_path, capsys):
    """#13 section 2 item 1: --to the base model's directory is refused; a directory with weights
    only with --overwrite."""
    mdir = tmp_path / "model"
    shutil.copytree(M.EMBEDDED_DIR, mdir)
    out = tmp_path / "run"
    assert _run(capsys, *TINY, "--rounds", 1, "--model", mdir, "--out", out)[0] == 0
    w0 = {p.name: p.read_bytes() for p in mdir.iterdir()}
    for extra in ([], ["--overwrite"], ["--model", mdir]):
        rc, so, se = _run(capsys, "export", "--out", out, "--to", mdir, *extra)
        assert rc == 2 and "base model directory" in _error_line(se), (extra, se)
    link = tmp_path / "link"
    link.symlink_to(mdir)
    rc, so, se = _run(capsys, "export", "--out", out, "--to", link)
    assert rc == 2 and "base model directory" in _error_line(se)
    assert {p.name: p.read_bytes() for p in mdir.iterdir()} == w0
    hf = tmp_path / "hf"
    assert _run(capsys, "export", "--out", out, "--to", hf)[0] == 0
    before = (hf / "model.safetensors").read_bytes()
    rc, so, se = _run(capsys, "export", "--out", out, "--to", hf)
    assert rc == 2 and "already holds weights" in _error_line(se)
    assert (hf / "model.safetensors").read_bytes() == before
    rc, so, se = _run(capsys, "export", "--out", out, "--to", hf, "--overwrite")
    assert rc == 0, se
    # the embedded model's own directory is a base model too
    emb = tmp_path / "emb"
    assert _run(capsys, *TINY, "--rounds", 1, "--out", emb)[0] == 0
    rc, so, se = _run(capsys, "export", "--out", emb, "--to", M.EMBEDDED_DIR, "--overwrite")
    assert rc == 2 and "base model directory" in _error_line(se)


def test_resume_accepts_the_same_model_by_a_relative_path(tmp_path, capsys, monkeypatch):
    """#13 section 2 item 8."""
    mdir = tmp_path / "models" / "tiny"
    shutil.copytree(M.EMBEDDED_DIR, mdir)
    out = tmp_path / "run"
    assert _run(capsys, *TINY, "--rounds", 1, "--model", mdir, "--out", out)[0] == 0
    monkeypatch.chdir(tmp_path)
    rc, so, se = _run(capsys, "--out", out, "--resume", "--rounds", 2, "--model", "models/tiny",
                      "--quiet")
    assert rc == 0, se
    rc, so, se = _run(capsys, "--out", out, "--resume", "--rounds", 3, "--model", "models",
                      "--quiet")  # another directory is judged by its weights (#24 item 12)
    assert rc == 2 and "has no config.json" in _error_line(se)


def test_interrupts_and_a_wrong_typed_checkpoint(tmp_path, capsys, monkeypatch):
    """#13 section 2 item 7: Ctrl-C gives one line that tells the truth about the checkpoint; a
    checkpoint with a valid checksum but a wrong-typed field is refused by name."""
    from kseed import rundir as R
    from kseed import simulation as S

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(S, "run", interrupted)
        rc, so, se = _run(capsys, *TINY, "--out", tmp_path / "a")
        assert rc == 2 and "before the first checkpoint; nothing to resume" in _error_line(se)
        mp.setattr(S, "checkpoint_config", interrupted)  # Ctrl-C while reading the checkpoint
        rc, so, se = _run(capsys, "--out", tmp_path / "a", "--resume")
        assert rc == 2 and "interrupted" in _error_line(se)
    good = tmp_path / "good"
    assert _run(capsys, *TINY, "--rounds", 1, "--out", good)[0] == 0
    with monkeypatch.context() as mp:
        mp.setattr(S, "run", interrupted)
        rc, so, se = _run(capsys, "--out", good, "--resume", "--rounds", 2, "--quiet")
        assert rc == 2 and "checkpoint is kept" in _error_line(se)
    doc = json.loads((good / "checkpoint.json").read_text())
    for field, value in (("client_loss", [1.0]), ("client_loss", {"0": "x"}), ("round", "1"),
                         ("acc", 5), ("base_identity", [1])):
        bad = json.loads(json.dumps(doc))
        bad["server"][field] = value
        bad["sha256"] = R._digest(R._payload(bad))  # a valid checksum over the edited checkpoint
        (good / "checkpoint.json").write_text(json.dumps(bad))
        rc, so, se = _run(capsys, "--out", good, "--resume", "--rounds", 2, "--quiet")
        line = _error_line(se)
        assert rc == 2 and "corrupt server checkpoint" in line and field in line, (field, line)
