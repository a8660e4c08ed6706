"""The run directory (kseed.rundir) and the eval-loss metrics: the lock, data identity on resume, no
truncation of another run's files, file modes, nothing left behind by a failed run, strict JSON."""
import json
import math
import os
import shutil

import pytest
import torch

from kseed import cli
from kseed import modeling as M
from kseed import simulation as S
from kseed.config import FedConfig
from kseed.rundir import RunDir, RunDirError, read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures")
TINY = ["--num-clients", "4", "--clients-per-round", "2", "--local-steps", "3", "-K", "16",
        "--eval-size", "8", "--rouge-size", "0", "--embedded-examples", "240", "--min-per-client", "5",
        "--batch-size", "2", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _run(capsys, *args):
    rc = cli.main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _error_line(err):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kseed-fed: error: "), err
    return lines[0]


def _snapshot(d):
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d))}


def _strict_loads(text):
    def bad(c):
        raise ValueError(f"bare {c} in JSON")
    return json.loads(text, parse_constant=bad)


def test_two_runs_on_one_out_are_refused(tmp_path, capsys):
    """#13 2.4: while a run holds the directory, a second run (fresh or resumed) gets a one-line error
    and writes nothing; once the first is done the directory is usable again."""
    out = tmp_path / "run"
    with RunDir(str(out)):
        for extra in ([], ["--resume"]):
            rc, so, se = _run(capsys, *TINY, "--rounds", 1, "--out", out, *extra)
            assert rc == 2
            line = _error_line(se)
            assert ("in use by another run" in line) if not extra else ("no checkpoint" in line), line
            assert os.listdir(out) == []
    assert _run(capsys, *TINY, "--rounds", 1, "--out", out)[0] == 0
    before = _snapshot(out)
    with RunDir(str(out), resume=True):
        rc, so, se = _run(capsys, "--out", out, "--resume", "--rounds", 2, "--quiet")
        assert rc == 2 and "in use by another run" in _error_line(se)
    assert _snapshot(out) == before
    assert _run(capsys, "--out", out, "--resume", "--rounds", 2, "--quiet")[0] == 0
    assert [r["round"] for r in read_metrics(str(out))] == [0, 1, 2]


def test_resume_with_changed_data_is_refused(tmp_path, capsys):
    """#13 2.5: the checkpoint records the data's identity; --resume after the data file changed is
    refused, naming the problem, and the checkpoint is kept."""
    data = tmp_path / "dolly.jsonl"
    shutil.copy(os.path.join(FIX, "dolly_small.jsonl"), data)
    out = tmp_path / "run"
    assert _run(capsys, *TINY, "--num-clients", 3, "--rounds", 1, "--data", data, "--out", out)[0] == 0
    ident = json.loads((out / "checkpoint.json").read_text())["data"]
    assert ident["dataset"] == "dolly" and ident["source"] == str(data) and len(ident["sha256"]) == 64
    before = _snapshot(out)
    lines = data.read_text().splitlines()
    row = json.loads(lines[0])
    row["response"] += " (edited)"
    data.write_text("\n".join([json.dumps(row)] + lines[1:]) + "\n")
    rc, so, se = _run(capsys, "--out", out, "--resume", "--rounds", 2, "--quiet")
    assert rc == 2
    line = _error_line(se)
    assert "the data differs from the checkpoint's" in line and str(data) in line, line
    assert _snapshot(out) == before
    data.write_text("\n".join(lines) + "\n")  # the original data again: resume works
    assert _run(capsys, "--out", out, "--resume", "--rounds", 2, "--quiet")[0] == 0


def test_resume_with_another_config_is_refused_by_the_loop(tmp_path):
    """The shared loop itself refuses a resumed config that differs (not only the CLI)."""
    cfg = FedConfig(rounds=1, num_clients=4, clients_per_round=2, local_steps=2, num_seeds=16,
                    eval_size=8, rouge_size=0, embedded_examples=240, min_per_client=5, batch_size=2)
    out = tmp_path / "run"
    S.run(cfg, str(out), progress=False)
    before = _snapshot(out)
    for change, msg in (({"lr": 0.5}, "lr=0.5"), ({"local_steps": 3}, "local-steps=3"),
                        ({"sampling": "pro", "eps": 0.01}, "eps=0.01.*sampling='pro'")):
        with pytest.raises(S.CheckpointError, match=msg):
            S.run(FedConfig(**{**cfg.to_dict(), **change, "rounds": 2}), str(out), resume=True,
                  progress=False)
    assert _snapshot(out) == before


def test_fresh_run_never_truncates_another_runs_files(tmp_path, capsys):
    """#13 2.6: a directory with a run's files but no checkpoint is refused, its files untouched."""
    out = tmp_path / "run"
    assert _run(capsys, *TINY, "--rounds", 1, "--out", out)[0] == 0
    (out / "checkpoint.json").unlink()
    before = _snapshot(out)
    assert b'"round": 1' in before["metrics.jsonl"]
    rc, so, se = _run(capsys, *TINY, "--rounds", 1, "--out", out)
    assert rc == 2
    line = _error_line(se)
    assert "already holds a run's files (metrics.jsonl, summary.json" in line, line
    assert _snapshot(out) == before
    only = tmp_path / "only-summary"
    only.mkdir()
    (only / "summary.json").write_text("{}")
    rc, so, se = _run(capsys, *TINY, "--rounds", 1, "--out", only)
    assert rc == 2 and "summary.json" in _error_line(se)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_file_modes_follow_the_umask(tmp_path, capsys, umask):
    """#13 2.9: checkpoint.json, summary.json and the rest get open()'s modes (0666 less the umask),
    not mkstemp's 0600."""
    old = os.umask(umask)
    try:
        out = tmp_path / "run"
        assert _run(capsys, *TINY, "--rounds", 1, "--out", out)[0] == 0
        assert _run(capsys, "--out", out, "--resume", "--rounds", 2, "--quiet")[0] == 0
    finally:
        os.umask(old)
    for name in ("checkpoint.json", "summary.json", "metrics.jsonl", "loss.png", "bytes.png"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_failed_run_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    """#13 2.9: a run that fails leaves neither the directories it made nor temp files; one that
    fails in a directory that existed leaves it as it was; a killed run's temp files are removed by
    the next run on the directory."""
    out = tmp_path / "new" / "deeper"
    rc, so, se = _run(capsys, *TINY, "--min-per-client", 500, "--rounds", 1, "--out", out)
    assert rc == 2 and "cannot give 4 clients" in _error_line(se)
    assert os.listdir(tmp_path) == []
    # a failure while round 0's checkpoint is written (e.g. a full disk), in a directory made here
    real = os.replace

    def full_disk(src, dst, **kw):  # the checkpoint's temp file is written, then the disk is full
        if str(dst).endswith("checkpoint.json"):
            raise OSError(28, "No space left on device")
        return real(src, dst, **kw)

    monkeypatch.setattr(os, "replace", full_disk)
    rc, so, se = _run(capsys, *TINY, "--rounds", 1, "--out", out)
    assert rc == 2 and "No space left" in _error_line(se)
    assert os.listdir(tmp_path) == []
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    rc, so, se = _run(capsys, *TINY, "--rounds", 1, "--out", existing)
    assert rc == 2 and sorted(os.listdir(existing)) == ["notes.txt"]
    monkeypatch.setattr(os, "replace", real)
    # a temp file from a run killed while writing is removed by the next run on the directory
    assert _run(capsys, *TINY, "--rounds", 1, "--out", existing)[0] == 0
    (existing / ".tmp-checkpoint.json-0123456789ab").write_text("torn")
    assert _run(capsys, "--out", existing, "--resume", "--rounds", 2, "--quiet")[0] == 0
    assert not [n for n in os.listdir(existing) if n.startswith(".tmp-")]
    assert "notes.txt" in os.listdir(existing)


def test_atomic_write_cleans_up_on_error(tmp_path):
    import kseed.rundir as R

    target = tmp_path / "f.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        R.atomic_write(str(target), object())
    with pytest.raises(FileNotFoundError):
        R.atomic_write(str(tmp_path / "no-such-dir" / "f.json"), "x")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.json"]


def test_rows_and_summary_are_strict_json(tmp_path):
    """NaN and inf anywhere in a row or the summary are written as null, never as a bare NaN."""
    out = tmp_path / "run"
    with RunDir(str(out)) as rd:
        row = rd.append({"round": 0, "train_loss": float("nan"), "eval_loss": float("inf"),
                         "nested": {"a": [1.5, float("-inf")]}, "clients": [0, 1]})
        assert row == {"round": 0, "train_loss": None, "eval_loss": None,
                       "nested": {"a": [1.5, None]}, "clients": [0, 1]}
        rd.write_summary({"eval_loss_first": float("nan"), "rouge_l": 0.25})
    assert _strict_loads((out / "metrics.jsonl").read_text()) == row
    assert _strict_loads((out / "summary.json").read_text()) == {"eval_loss_first": None,
                                                                 "rouge_l": 0.25}


def test_eval_loss_both_metrics(gen):
    """eval_loss(both=True): kseed's token-weighted mean and the reference's mean of per-example
    token means, against a direct per-example computation; the default is the token-weighted one."""
    model, tok = M.load_model(M.EMBEDDED_DIR)
    from kseed.datasets import generate_embedded

    ex = generate_embedded(40, seed=int(torch.randint(0, 1 << 30, (1,), generator=gen)))
    items = M.tokenize_examples(tok, ex, 128)
    tok_mean, ex_mean = M.eval_loss(model, items, tok.pad_token_id, "cpu", batch_size=7, both=True)
    assert M.eval_loss(model, items, tok.pad_token_id, "cpu", batch_size=7) == tok_mean
    sums, counts = [], []
    with torch.no_grad():
        for ids, npr in items:  # one example at a time: no padding
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits.float()[0, :-1]
            nll = torch.nn.functional.cross_entropy(logits[npr - 1:], x[0, npr:], reduction="none")
            sums.append(float(nll.double().sum()))
            counts.append(len(ids) - npr)
    assert len(set(counts)) > 1  # responses of different lengths: the two means differ
    want_tok = sum(sums) / sum(counts)
    want_ex = sum(s / n for s, n in zip(sums, counts)) / len(items)
    assert math.isclose(tok_mean, want_tok, rel_tol=1e-5)
    assert math.isclose(ex_mean, want_ex, rel_tol=1e-5)
    assert abs(tok_mean - ex_mean) > 1e-3


def test_metrics_and_summary_name_both_eval_losses(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(capsys, *TINY, "--rounds", 2, "--out", out)[0] == 0
    rows = [_strict_loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["eval_loss"] > 0 and r["eval_loss_example_mean"] > 0
        assert r["eval_loss"] != r["eval_loss_example_mean"]
    s = _strict_loads((out / "summary.json").read_text())
    assert s["eval_loss_first"] == rows[0]["eval_loss"] and s["eval_loss_last"] == rows[-1]["eval_loss"]
    assert s["eval_loss_example_mean_first"] == rows[0]["eval_loss_example_mean"]
    assert s["eval_loss_example_mean_last"] == rows[-1]["eval_loss_example_mean"]
    assert s["engine"] == "simulation" and s["data"]["dataset"] == "embedded"
