"""Issue #24, the driver items: export over the base model through a copy or a link, the summary of
a diverged run, no response tokens, a tokenizer without pad/EOS/unk, --max-new-tokens 0, a moved
base model on --resume, Ctrl-C at import, model load and export, and three small input defects."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from kseed import modeling as M
from kseed import rounds as R
from kseed import rundir as RD
from kseed.datasets import generate_embedded, load_dolly

from test_driver_cli import FIX, ROOT, TINY, _error_line, _metrics, _run

QUICK = [a for a in TINY]
QUICK[QUICK.index("--rouge-size") + 1] = "0"  # no generation: the tests that need Rouge say so


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _copy_model(dst):
    shutil.copytree(M.EMBEDDED_DIR, dst)
    return dst


def _no_special_tokens(dst):
    """A copy of the embedded model whose tokenizer has no pad, EOS or unk token."""
    _copy_model(dst)
    p = dst / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    for key in ("pad_token", "eos_token", "unk_token"):
        cfg.pop(key)
    p.write_text(json.dumps(cfg))
    return dst


# ------------------------------------------------------------------------------- item 2: export
def test_export_refuses_the_recorded_base_model_when_model_names_a_copy(tmp_path, capsys):
    orig = _copy_model(tmp_path / "orig")
    out = tmp_path / "run"
    assert _run(capsys, *QUICK, "--rounds", 1, "--model", orig, "--out", out)[0] == 0
    copy = _copy_model(tmp_path / "copy")
    w0 = (orig / "model.safetensors").read_bytes()
    rc, so, se = _run(capsys, "export", "--out", out, "--to", orig, "--model", copy, "--overwrite")
    assert rc == 2 and "base model directory" in _error_line(se), se
    assert (orig / "model.safetensors").read_bytes() == w0
    # a directory whose weights file is the base model's (a hard link), by --model or the record
    for base in (orig, copy):
        linked = tmp_path / f"linked-{base.name}"
        linked.mkdir()
        shutil.copy(orig / "config.json", linked)
        os.link(base / "model.safetensors", linked / "model.safetensors")
        rc, so, se = _run(capsys, "export", "--out", out, "--to", linked, "--model", copy,
                          "--overwrite")
        assert rc == 2 and "same file as the base model's" in _error_line(se), (base, se)
    assert (orig / "model.safetensors").read_bytes() == w0
    assert (copy / "model.safetensors").read_bytes() == w0
    # and the run still exports (and so resumes) from its base model
    assert _run(capsys, "export", "--out", out, "--to", tmp_path / "hf")[0] == 0


# ----------------------------------------------------------------------- items 3 and 6: summary
def _nan_after_round0(monkeypatch):
    """Every held-out loss after round 0 is NaN, as in a run that diverged."""
    real = R.global_evaluator

    def evaluator(cfg, ws, server, eval_ex):
        evaluate = real(cfg, ws, server, eval_ex)

        def ev(with_rouge):
            e = evaluate(with_rouge)
            return e if server.round == 0 else e._replace(loss=math.nan, loss_example_mean=math.nan)
        return ev

    monkeypatch.setattr(R, "global_evaluator", evaluator)


def test_a_diverged_run_reports_null_and_says_so(tmp_path, capsys, monkeypatch):
    _nan_after_round0(monkeypatch)
    out = tmp_path / "run"
    rc, so, se = _run(capsys, *QUICK, "--rounds", 2, "--out", out)
    assert rc == 0, se
    rows = _metrics(out)
    assert rows[0]["eval_loss"] > 0 and rows[-1]["eval_loss"] is None
    s = json.loads((out / "summary.json").read_text())
    assert s["eval_loss_first"] == rows[0]["eval_loss"]
    assert s["eval_loss_last"] is None and s["eval_loss_example_mean_last"] is None
    assert s["diverged"] is True and s["eval_loss_drop_pct"] is None
    assert s["eval_loss_last_finite"] == rows[0]["eval_loss"]
    assert s["eval_loss_last_finite_round"] == 0
    line = so.strip().splitlines()[-1]
    assert "diverged" in line and "at round 0" in line, line


def test_a_finite_run_summary_and_final_line(tmp_path, capsys):
    out = tmp_path / "run"
    rc, so, se = _run(capsys, *QUICK, "--rounds", 2, "--eval-every", 0, "--out", out)
    assert rc == 0, se
    rows = _metrics(out)
    assert rows[1]["eval_loss"] is None  # not evaluated (--eval-every 0), not NaN
    s = json.loads((out / "summary.json").read_text())
    assert s["diverged"] is False and s["eval_loss_last"] == rows[-1]["eval_loss"]
    assert s["eval_loss_last_finite_round"] == 2
    assert "% drop" in so and "diverged" not in so


def test_final_line_formats_every_null():
    from kseed.cli import _final_line
    s = {"rounds": 1, "held_out": "x", "eval_loss_first": 2.0, "eval_loss_last": 2.0,
         "eval_loss_drop_pct": None, "diverged": False, "rouge_l": None, "rouge_examples": 0,
         "bytes_down_total": 1, "bytes_up_total": 2, "seconds_this_process": 0.5}
    assert "2.0000 -> 2.0000;" in _final_line(s, "out")
    s.update(eval_loss_first=None, eval_loss_last=None, diverged=None)
    assert "n/a -> n/a" in _final_line(s, "out")


# ------------------------------------------------------------ items 4 and 8: tokens and padding
def test_no_response_tokens_is_no_loss_and_no_pad_token_pads_with_0(tmp_path):
    model, tok = M.load_model(str(_no_special_tokens(tmp_path / "m")))
    assert tok.pad_token_id is None and tok.eos_token_id is None and tok.unk_token_id is None
    ws = M.Workspace(model, tok)
    assert ws.pad_id == 0
    ex = generate_embedded(6, seed=3)
    items = M.tokenize_examples(tok, ex, 64)
    loss, per_example = M.eval_loss(model, items, ws.pad_id, "cpu", batch_size=4, both=True)
    assert loss > 0 and per_example > 0
    # padding with id 0 changes nothing: each example alone (no padding) gives the same loss
    alone = [M.eval_loss(model, [it], ws.pad_id, "cpu") for it in items]
    lens = [len(ids) - n for ids, n in items]
    assert math.isclose(loss, sum(a * n for a, n in zip(alone, lens)) / sum(lens), rel_tol=1e-5)
    empty = M.tokenize_examples(tok, [dict(e, output="") for e in ex], 64)
    assert all(len(ids) == n for ids, n in empty)  # no response token at all
    assert M.eval_loss(model, empty, ws.pad_id, "cpu") is None
    assert M.eval_loss(model, empty, ws.pad_id, "cpu", both=True) == (None, None)
    assert math.isnan(M.batch_loss(model, M.collate(empty[:2], ws.pad_id, "cpu")))
    # a zeroth-order step on such a batch is skipped, never taken on a zero loss
    batch = M.collate(empty[:2], ws.pad_id, "cpu")
    res = ws.ms.zo_step(7, lambda: M.batch_loss(model, batch), eps=1e-3, lr=1e-4)
    ws.ms.restore_pending()
    assert res.skipped


def test_a_run_with_a_tokenizer_without_pad_eos_and_unk(tmp_path, capsys):
    mdir = _no_special_tokens(tmp_path / "m")
    out = tmp_path / "run"
    rc, so, se = _run(capsys, *TINY, "--rounds", 1, "--rouge-size", 1, "--max-new-tokens", 2,
                      "--model", mdir, "--out", out)
    assert rc == 0, se
    s = json.loads((out / "summary.json").read_text())
    assert s["eval_loss_last"] > 0 and s["rouge_l"] is not None


# ---------------------------------------------------------------------- item 7: max-new-tokens
def test_max_new_tokens_0_refused_up_front_and_summary_survives_the_final_evaluation(
        tmp_path, capsys, monkeypatch):
    fresh = tmp_path / "fresh"
    rc, so, se = _run(capsys, *TINY, "--rounds", 1, "--max-new-tokens", 0, "--out", fresh)
    assert rc == 2 and "--max-new-tokens must be >= 1" in _error_line(se), se
    assert not fresh.exists()
    # without Rouge-L it is a valid setting
    out = tmp_path / "run"
    assert _run(capsys, *QUICK, "--rounds", 1, "--max-new-tokens", 0, "--out", out)[0] == 0
    # a checkpoint written by a version that accepted it with Rouge-L on: a plain --resume is
    # refused up front, and resumes with a valid value (a resumed run may change it)
    doc = json.loads((out / "checkpoint.json").read_text())
    doc["server"]["config"]["rouge_size"] = 2
    doc["sha256"] = RD._digest(RD._payload(doc))
    (out / "checkpoint.json").write_text(json.dumps(doc, sort_keys=True))
    before = (out / "checkpoint.json").read_bytes()
    rc, so, se = _run(capsys, "--out", out, "--resume", "--rounds", 2, "--quiet")
    assert rc == 2 and "--max-new-tokens must be >= 1" in _error_line(se), se
    assert (out / "checkpoint.json").read_bytes() == before
    # an end-of-run evaluation that fails still leaves the summary and the plots
    for name in ("summary.json", "loss.png"):
        (out / name).unlink()

    def broken(*a, **k):
        raise ValueError("generation failed")

    with monkeypatch.context() as mp:
        mp.setattr(M, "rouge_l", broken)
        rc, so, se = _run(capsys, "--out", out, "--resume", "--rounds", 2, "--max-new-tokens", 3,
                          "--quiet")
    assert rc == 2 and "generation failed" in _error_line(se), se
    s = json.loads((out / "summary.json").read_text())
    assert s["rounds"] == 2 and "generation failed" in s["final_evaluation_error"]
    assert s["rouge_l"] is None and s["eval_loss_last"] == _metrics(out)[-1]["eval_loss"]
    assert (out / "loss.png").exists()
    rc, so, se = _run(capsys, "--out", out, "--resume", "--rounds", 2, "--max-new-tokens", 3,
                      "--quiet")
    assert rc == 0, se
    s = json.loads((out / "summary.json").read_text())
    assert s["rouge_l"] is not None and "final_evaluation_error" not in s


# -------------------------------------------------------------------- item 12: a moved model
def test_resume_accepts_a_moved_model_with_the_same_hash(tmp_path, capsys):
    a = _copy_model(tmp_path / "a")
    out = tmp_path / "run"
    assert _run(capsys, *QUICK, "--rounds", 1, "--model", a, "--out", out)[0] == 0
    b = tmp_path / "b"
    a.rename(b)
    rc, so, se = _run(capsys, "--out", out, "--resume", "--rounds", 2, "--quiet")
    assert rc == 2 and "not found" in _error_line(se)
    rc, so, se = _run(capsys, "--out", out, "--resume", "--rounds", 2, "--model", b, "--quiet")
    assert rc == 0, se
    doc = json.loads((out / "checkpoint.json").read_text())
    assert doc["server"]["config"]["model"] == str(b)
    assert doc["server"]["base_identity"]["model"] == str(b)
    # later resumes and exports need no --model
    assert _run(capsys, "--out", out, "--resume", "--rounds", 3, "--quiet")[0] == 0
    assert _run(capsys, "export", "--out", out, "--to", tmp_path / "hf")[0] == 0
    # a model with other weights is refused by its hash
    other = _copy_model(tmp_path / "other")
    m, _ = M.load_model(str(other))
    with torch.no_grad():
        m.model.norm.weight.add_(0.01)
    m.save_pretrained(str(other), safe_serialization=True)
    rc, so, se = _run(capsys, "--out", out, "--resume", "--rounds", 4, "--model", other, "--quiet")
    assert rc == 2 and "another base model" in _error_line(se), se
    assert len(_metrics(out)) == 4


# ------------------------------------------------------------------------------ item 13: Ctrl-C
_SIGINT_AT_TORCH = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job starts with it ignored
class SigintAtTorch:  # Ctrl-C exactly when torch starts to import
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, SigintAtTorch())
sys.argv = ["kseed-fed"] + sys.argv[1:]
"""


@pytest.mark.parametrize("entry", [
    "from kseed.cli import main\nsys.exit(main())",  # what the kseed-fed console script runs
    "import runpy\nrunpy.run_module('kseed', run_name='__main__', alter_sys=True)",  # python -m
])
def test_ctrl_c_while_importing_gives_one_line(tmp_path, entry):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", _SIGINT_AT_TORCH + entry, "--rounds", "1", "--out",
                        str(out)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT}/python"))
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "interrupted during start-up; nothing was written" in _error_line(p.stderr)
    assert not out.exists()


@pytest.fixture
def sigint_raises():
    """Ctrl-C raises KeyboardInterrupt in this process, as in a terminal, also where the test run was
    started as a shell's background job (which inherits SIGINT ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_turned_into_an_import_error_while_loading_is_still_an_interrupt(monkeypatch,
                                                                                 sigint_raises):
    import transformers

    def interrupted_then_wrapped(*a, **k):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10 ** 8):  # the handler runs at the next bytecode
                pass
        except KeyboardInterrupt:
            raise ImportError("cannot import name 'LlamaForCausalLM'") from None

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", interrupted_then_wrapped)
    with pytest.raises(KeyboardInterrupt):
        M.load_model(M.EMBEDDED_DIR)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def failing(*a, **k):
        raise ImportError("no such model class")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", failing)
    with pytest.raises(M.ModelError, match="no such model class"):
        M.load_model(M.EMBEDDED_DIR)


def test_ctrl_c_during_export_writes_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert _run(capsys, *QUICK, "--rounds", 1, "--out", out)[0] == 0
    import transformers
    real = transformers.PreTrainedModel.save_pretrained

    def save_then_interrupt(self, *a, **k):
        real(self, *a, **k)  # the weights are on disk, the tokenizer not yet
        raise KeyboardInterrupt

    hf = tmp_path / "deep" / "hf"
    with monkeypatch.context() as mp:
        mp.setattr(transformers.PreTrainedModel, "save_pretrained", save_then_interrupt)
        rc, so, se = _run(capsys, "export", "--out", out, "--to", hf)
        assert rc == 2 and "export interrupted; nothing was written" in _error_line(se), se
        assert not (tmp_path / "deep").exists()
        assert sorted(os.listdir(tmp_path)) == ["run"]
    done = tmp_path / "done"
    assert _run(capsys, "export", "--out", out, "--to", done)[0] == 0
    before = {p.name: p.read_bytes() for p in done.iterdir()}
    with monkeypatch.context() as mp:
        mp.setattr(transformers.PreTrainedModel, "save_pretrained", save_then_interrupt)
        rc, so, se = _run(capsys, "export", "--out", out, "--to", done, "--overwrite")
        assert rc == 2 and "nothing was written" in _error_line(se), se
    assert {p.name: p.read_bytes() for p in done.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["done", "run"]
    assert oct(done.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    assert _run(capsys, "export", "--out", out, "--to", done, "--overwrite")[0] == 0


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


# ------------------------------------------------------------------------------ item 14: small
def test_dolly_with_a_byte_order_mark(tmp_path):
    src = os.path.join(FIX, "dolly_small.jsonl")
    bom = tmp_path / "bom.jsonl"
    with open(src, "rb") as f:
        bom.write_bytes(b"\xef\xbb\xbf" + f.read())
    assert load_dolly(str(bom)) == load_dolly(src)


def test_a_null_metrics_line_and_a_checkpoint_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(capsys, *QUICK, "--rounds", 1, "--out", out)[0] == 0
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text(lines[0] + "null\n" + "".join(lines[1:]))
    rc, so, se = _run(capsys, "--out", out, "--resume", "--rounds", 2, "--quiet")
    line = _error_line(se)
    assert rc == 2 and "metrics.jsonl:2" in line and "null" in line, line
    d = tmp_path / "dir"
    (d / "checkpoint.json").mkdir(parents=True)
    rc, so, se = _run(capsys, "--out", d, "--resume", "--quiet")
    assert rc == 2 and "is a directory" in _error_line(se), se
