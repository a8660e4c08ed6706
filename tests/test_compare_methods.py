"""bench/compare_methods.py (issue 22): every method side by side, one table and two plots.

Fast tests build run directories by hand (summary.json, metrics.jsonl, checkpoint.json with known
numbers) and check the table, the plots' data and the option handling; the slow test runs the
comparison reduced (2 methods, 2 seeds, 2 rounds of 2 local steps, 8 held-out examples, Rouge-L on 2)
and checks every number of the table against the runs' own files, recomputed here independently.
"""
import dataclasses
import json
import math
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import compare_methods as cm  # noqa: E402
from kseed import methods as registry  # noqa: E402
from kseed.config import FedConfig  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ helpers
def parse_table(text):
    """{method: {column: cell}} of compare.md's table."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == list(cm.COLUMNS)
    assert set(lines[1].replace("|", "")) == {"-"}
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert len(cells) == len(head), ln
        rows[cells[0]] = dict(zip(head, cells))
    return rows


def num(cell):
    return None if cell == "-" else float(cell.replace(",", ""))


def pm(cell):
    a, b = cell.split(" +- ")
    return num(a), num(b)


def close(cell_value, exact, decimals):
    """The table's rounded ``cell_value`` is ``exact`` rounded to ``decimals``."""
    if exact is None:
        return cell_value is None
    return cell_value is not None and abs(cell_value - exact) <= 0.5 * 10 ** -decimals + 1e-12


def mean(xs):
    return sum(xs) / len(xs)


def sd(xs):
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def expected(out, method, seeds):
    """The table's numbers for ``method``, recomputed from the runs' files (not through cm)."""
    summ, rows = [], []
    for s in seeds:
        d = os.path.join(out, method, f"seed-{s}")
        with open(os.path.join(d, "summary.json")) as f:
            summ.append(json.load(f))
        with open(os.path.join(d, "metrics.jsonl")) as f:
            rows.append([json.loads(ln) for ln in f if ln.strip()])

    def per_msg(rs, key, who):
        rr = [r for r in rs if r["round"] >= 1]
        return sum(r[key] for r in rr) / sum(len(r[who]) for r in rr)

    e = {"runs": len(seeds),
         "loss": (mean([s["eval_loss_last"] for s in summ]), sd([s["eval_loss_last"] for s in summ])),
         "first": mean([s["eval_loss_first"] for s in summ]),
         "down": mean([per_msg(rs, "bytes_down", "bytes_down_per_client") for rs in rows]),
         "up": mean([per_msg(rs, "bytes_up", "bytes_up_per_client") for rs in rows]),
         "down_total": mean([s["bytes_down_total"] for s in summ]),
         "up_total": mean([s["bytes_up_total"] for s in summ]),
         "s": mean([mean([r["seconds"] for r in rs if r["round"] >= 1]) for rs in rows]),
         "rebuild": mean([s["rebuild_seconds_this_process"] / s["rounds"] for s in summ])}
    rl = [s["rouge_l"] for s in summ if s.get("rouge_l") is not None]
    e["rouge"] = (mean(rl), sd(rl)) if rl else (None, None)
    rss = [s["peak_rss_bytes_this_process"] for s in summ
           if s.get("peak_rss_bytes_this_process") is not None]
    e["rss"] = mean(rss) / 2 ** 20 if rss else None
    return e


def check_row(row, e):
    assert int(row["runs"].split()[0]) == e["runs"]
    loss, loss_sd = pm(row["final held-out loss (mean +- sd)"])
    assert close(loss, e["loss"][0], 4) and close(loss_sd, e["loss"][1], 4), (row, e)
    assert close(num(row["first"]), e["first"], 4)
    rouge, rouge_sd = pm(row["Rouge-L (mean +- sd)"])
    assert close(rouge, e["rouge"][0], 4) and close(rouge_sd, e["rouge"][1], 4), (row, e)
    assert close(num(row["bytes down / client / round"]), e["down"], 0)
    assert close(num(row["bytes up / client / round"]), e["up"], 0)
    assert close(num(row["bytes down total"]), e["down_total"], 0)
    assert close(num(row["bytes up total"]), e["up_total"], 0)
    assert close(num(row["s / round"]), e["s"], 2)
    assert close(num(row["rebuild s / round"]), e["rebuild"], 4)
    assert close(num(row["peak RSS MiB"].split(" (")[0]), e["rss"], 1), (row, e)


def make_run(out, method, seed, *, losses, rouge=0.25, down=100, up=40, clients=2, seconds=1.5,
             rss=300 * 2 ** 20, cfg=None):
    """A finished run directory with metrics rows for ``losses`` (round 0..) and its summary."""
    d = os.path.join(out, method, f"seed-{seed}")
    os.makedirs(d)
    rows = []
    for r, loss in enumerate(losses):
        row = {"round": r, "eval_loss": loss, "bytes_down": 0 if r == 0 else down * clients,
               "bytes_up": 0 if r == 0 else up * clients, "seconds": 0.2 if r == 0 else seconds + r}
        if r:
            row["bytes_down_per_client"] = {str(c): down for c in range(clients)}
            row["bytes_up_per_client"] = {str(c): up for c in range(clients)}
        rows.append(row)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    n = len(losses) - 1
    summary = {"rounds": n, "eval_loss_first": losses[0], "eval_loss_last": losses[-1],
               "rouge_l": rouge, "bytes_down_total": down * clients * n,
               "bytes_up_total": up * clients * n, "rebuild_seconds_this_process": 0.1 * n,
               "peak_rss_bytes_this_process": rss}
    with open(os.path.join(d, "summary.json"), "w") as f:
        json.dump(summary, f)
    m, sets = cm.resolve(method)
    config = dataclasses.asdict(dataclasses.replace(FedConfig(), **m.configure(sets)))
    config.update(cfg or {}, seed=seed)
    with open(os.path.join(d, "checkpoint.json"), "w") as f:
        json.dump({"server": {"config": config}}, f)
    return d


# ------------------------------------------------------------------------------ fast tests
def test_methods_default_to_the_registry_and_the_aliases(monkeypatch):
    names = cm.all_methods()
    assert set(names) == set(registry.NAMES) | set(registry.ALIASES)
    assert names.index("fedkseed-pro") == names.index("fedkseed") + 1
    assert cm.parse_methods("all") == names
    assert cm.parse_methods("fedkseed-pro, mezo,mezo") == ["fedkseed-pro", "mezo"]
    with pytest.raises(ValueError, match="unknown method 'nope'.*fedkseed-pro"):
        cm.parse_methods("fedkseed,nope")
    # a method added to the registry is compared without a change to the tool
    monkeypatch.setattr(registry, "NAMES", registry.NAMES + ("newmethod",))
    assert cm.all_methods()[-1] == "newmethod"
    assert cm.parse_methods("newmethod") == ["newmethod"]


def test_default_seeds_are_one_to_five():
    assert cm.parse_seeds(cm.DEFAULT_SEEDS) == [1, 2, 3, 4, 5]
    assert cm.parse_seeds("1-3,7") == [1, 2, 3, 7]


def test_passthrough_options_go_to_the_methods_that_take_them():
    extra = ["--rounds", "2", "-K", "16", "--eps=1e-3", "--num-clients", "4", "--sampling", "uniform",
             "--equal-weights", "--n-accum", "2"]
    kept, dropped = cm.method_args("fedkseed", extra)
    assert kept == ["--rounds", "2", "-K", "16", "--eps=1e-3", "--num-clients", "4", "--sampling",
                    "uniform", "--equal-weights"] and dropped == ["--n-accum"]
    kept, dropped = cm.method_args("fedkseed-pro", extra)  # the alias fixes --sampling
    assert "--sampling" in dropped and "uniform" not in kept
    kept, dropped = cm.method_args("mezo", extra)  # one client: no federation options, no pool
    assert kept == ["--rounds", "2", "--eps=1e-3"]
    assert dropped == ["-K", "--num-clients", "--sampling", "--equal-weights", "--n-accum"]
    kept, dropped = cm.method_args("ferret", extra)
    assert kept == ["--rounds", "2", "-K", "16", "--num-clients", "4", "--equal-weights", "--n-accum",
                    "2"] and dropped == ["--eps", "--sampling"]
    # options kseed-fed does not know are passed on (kseed-fed names them)
    assert cm.method_args("mezo", ["--bogus", "1"])[0] == ["--bogus", "1"]


def test_own_options_after_the_separator_are_refused(capsys):
    with pytest.raises(SystemExit):
        cm.main(["--report-only", "--out", "x", "--", "--seed", "3"])
    assert "--seed after --" in capsys.readouterr().err


def test_table_numbers_come_from_the_runs(tmp_path):
    out = str(tmp_path)
    make_run(out, "fedkseed", 1, losses=[1.8, 1.5, 1.25], rouge=0.2, seconds=2.0)
    make_run(out, "fedkseed", 2, losses=[1.7, 1.4, 1.15], rouge=0.4, seconds=3.0, rss=500 * 2 ** 20)
    make_run(out, "mezo", 1, losses=[1.8, 1.6, 1.3], down=144, up=36, clients=1, rouge=None, rss=None)
    make_run(out, "mezo", 2, losses=[1.7, 1.5, 1.2], down=144, up=36, clients=1, rouge=None, rss=None)
    d = make_run(out, "mezo", 4, losses=[1.7, 1.5, None], down=144, up=36, clients=1, rss=None)
    with open(os.path.join(d, "summary.json")) as f:
        s = json.load(f)
    with open(os.path.join(d, "summary.json"), "w") as f:
        json.dump({**s, "diverged": True, "rouge_l": None}, f)
    os.makedirs(os.path.join(out, "mezo", "seed-3"))  # not finished: left out
    text = cm.report(out, ["fedkseed", "mezo", "ferret"], [1, 2, 3, 4])
    with open(os.path.join(out, "compare.md")) as f:
        assert f.read() == text
    rows = parse_table(text)
    assert rows["fedkseed"]["final held-out loss (mean +- sd)"] == "1.2000 +- 0.0707"
    assert rows["fedkseed"]["Rouge-L (mean +- sd)"] == "0.3000 +- 0.1414"
    assert rows["fedkseed"]["bytes down / client / round"] == "100"
    assert rows["fedkseed"]["bytes up total"] == "160"
    assert rows["fedkseed"]["s / round"] == "4.00"  # rounds of 2+1, 2+2 and 3+1, 3+2 s
    assert rows["fedkseed"]["peak RSS MiB"] == "400.0"
    assert rows["mezo"]["Rouge-L (mean +- sd)"] == "- +- -"
    assert rows["mezo"]["peak RSS MiB"] == "-"
    assert rows["mezo"]["bytes up / client / round"] == "36"
    assert rows["ferret"]["runs"] == "0"
    assert rows["mezo"]["runs"] == "3 (1 diverged)"
    assert rows["mezo"]["final held-out loss (mean +- sd)"] == "1.2500 +- 0.0707"  # seeds 1, 2
    assert rows["mezo"]["first"] == "1.7333"  # every run's base model
    check_row(rows["fedkseed"], expected(out, "fedkseed", [1, 2]))
    shutil.rmtree(os.path.join(out, "mezo", "seed-4"))
    check_row(parse_table(cm.report(out, ["mezo"], [1, 2, 3, 4]))["mezo"], expected(out, "mezo", [1, 2]))
    assert "- fedkseed: rounds=10, num_clients=8" in text and "sampling=uniform" in text
    assert "- mezo: rounds=10, num_clients=1, clients_per_round=1" in text
    assert "num_seeds" not in text.split("- mezo:")[1].splitlines()[0]
    assert "same budget" not in text and "were not the same" in text
    for name in cm.PLOTS:
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == PNG_MAGIC
        assert f"]({name})" in text


def test_a_changed_lr_is_named_in_the_tuning_note(tmp_path):
    out = str(tmp_path)
    make_run(out, "ferret", 1, losses=[1.8, 1.2], cfg={"lr": 0.01})
    text = cm.report(out, ["ferret"], [1])
    assert "- ferret: lr 0.01 set on the command line (default 0.03)" in text


def test_mean_curve_band_and_axes(tmp_path):
    out = str(tmp_path)
    make_run(out, "fedmezo", 1, losses=[2.0, 1.6, None, 1.2], down=10, up=30, seconds=1.0)
    make_run(out, "fedmezo", 2, losses=[2.2, 1.2, 1.5, 1.0], down=10, up=30, seconds=2.0)
    runs = [cm.read_run(os.path.join(out, "fedmezo", f"seed-{s}")) for s in (1, 2)]
    c = cm.mean_curve(runs)
    assert [p["round"] for p in c] == [0, 1, 3]  # round 2: one seed did not evaluate it
    assert c[1]["loss"] == pytest.approx(1.4) and (c[1]["lo"], c[1]["hi"]) == (1.2, 1.6)
    assert [p["bytes"] for p in c] == [0, 40, 120]  # one client's down + up, cumulated
    # seconds of rounds 1..r: seed 1 (1+1) + (1+2) + (1+3), seed 2 one more per round
    assert [p["seconds"] for p in c] == [0, 2.5, 10.5]
    pngs = cm.render_plots({"fedmezo": c}, {"fedmezo": 2})
    assert sorted(pngs) == sorted(cm.PLOTS) and all(p[:8] == PNG_MAGIC for p in pngs.values())


def test_report_only_cli_reads_the_layout(tmp_path, capsys):
    out = str(tmp_path)
    make_run(out, "fedkseed-pro", 4, losses=[1.8, 1.3])
    assert cm.main(["--out", out, "--methods", "fedkseed-pro", "--seeds", "3-4", "--report-only"]) == 0
    rows = parse_table(capsys.readouterr().out)
    assert rows["fedkseed-pro"]["runs"] == "1"
    assert "sampling=pro" in open(os.path.join(out, "compare.md")).read()


def test_peak_memory_of_the_process(monkeypatch):
    import types

    import torch
    from kseed.rounds import peak_memory
    cpu = peak_memory(torch.device("cpu"))
    assert set(cpu) == {"peak_rss_bytes_this_process"}
    # ru_maxrss is in KiB on Linux: this process holds torch, so well over 50 MiB of bytes
    assert isinstance(cpu["peak_rss_bytes_this_process"], int)
    assert cpu["peak_rss_bytes_this_process"] > 50 * 2 ** 20
    seen = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: seen.append(d) or 12345)
    dev = types.SimpleNamespace(type="cuda")
    assert peak_memory(dev)["peak_cuda_bytes_this_process"] == 12345 and seen == [dev]


# ------------------------------------------------------------------------------ slow test
REDUCED = ["--rounds", "2", "--local-steps", "2", "--eval-size", "8", "--rouge-size", "2",
           "--max-new-tokens", "4", "--embedded-examples", "200", "--num-seeds", "16"]


@pytest.mark.slow
def test_reduced_comparison_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "cmp")
    methods, seeds = ["fedkseed", "mezo"], [1, 2]
    rc = cm.main(["--out", out, "--methods", ",".join(methods), "--seeds", "1-2", "--jobs", "2", "--",
                  *REDUCED])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "--method mezo does not take --num-seeds" in captured.err
    with open(os.path.join(out, "compare.md")) as f:
        text = f.read()
    for name in cm.PLOTS:
        with open(os.path.join(out, name), "rb") as f:
            png = f.read()
        assert png[:8] == PNG_MAGIC and len(png) > 10_000, name
    rows = parse_table(text)
    assert sorted(rows) == sorted(methods)
    for m in methods:
        e = expected(out, m, seeds)
        assert e["rss"] is not None and e["rouge"][0] is not None  # the run recorded both
        check_row(rows[m], e)
    assert "num_seeds=16, local_steps=2" in text
    # a second call resumes: every run finished, nothing runs again
    mtime = os.path.getmtime(os.path.join(out, "mezo", "seed-1", "summary.json"))
    assert cm.main(["--out", out, "--methods", ",".join(methods), "--seeds", "1-2", "--", *REDUCED]) == 0
    assert "4 runs (4 finished before)" in capsys.readouterr().err
    assert os.path.getmtime(os.path.join(out, "mezo", "seed-1", "summary.json")) == mtime
