"""The driver's noise family (issue #12): kseed-fed --noise, the down message's noise flag, the
checkpoint, resume, export and the Flower run config, with Rademacher runs end to end."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import kseed_kernels as kk
from kseed import cli
from kseed import modeling as M
from kseed import protocol as P
from kseed.client import FedKSeedClient, check_down
from kseed.config import NOISES, FedConfig
from test_driver_cli import _metrics as _cli_metrics  # the CLI tests' helpers
from test_driver_cli import _run, _strip

TINY = ["--num-clients", "4", "--clients-per-round", "2", "--local-steps", "4", "-K", "16",
        "--eval-size", "8", "--rouge-size", "0", "--embedded-examples", "240",
        "--min-per-client", "5", "--batch-size", "2", "--quiet"]


def _metrics(d):
    return _strip(_cli_metrics(d))


def _ckpt(d):
    with open(os.path.join(d, "checkpoint.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------------- config and CLI
def test_config_noise_default_validation_and_old_checkpoints():
    assert NOISES == ("gaussian", "rademacher") and FedConfig().noise == "gaussian"
    FedConfig(noise="rademacher").validate()
    for bad in ("uniform", "Rademacher", "", None, 1):
        with pytest.raises(ValueError, match="--noise must be gaussian | rademacher"):
            FedConfig(noise=bad).validate()
    old = FedConfig(noise="rademacher").to_dict()
    del old["noise"]  # a checkpoint written before the field existed
    assert FedConfig.from_dict(old).noise == "gaussian"
    assert FedConfig.from_dict(FedConfig(noise="rademacher").to_dict()).noise == "rademacher"


def test_cli_bad_noise_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--noise", "uniform", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--noise" in err and "invalid choice: 'uniform'" in err and "rademacher" in err
    assert not (tmp_path / "x").exists()
    assert "--noise" in cli._parser().format_help()


def test_flower_run_config_has_noise():
    from kseed.flower import app_dir
    from kseed.flower.runconfig import default_run_config, fed_config

    assert default_run_config()["noise"] == "gaussian"
    text = (app_dir() / "pyproject.toml").read_text()
    assert '\nnoise = "gaussian"\n' in text
    assert fed_config({"noise": "rademacher"}).noise == "rademacher"
    assert fed_config({}).noise == "gaussian"
    with pytest.raises(ValueError, match="--noise"):
        fed_config({"noise": "bernoulli"})


# ---------------------------------------------------------------------------------- protocol
def _down(noise, cfg, probs=None, rnd=1, cid=0):
    seeds = P.seed_pool(cfg.seed, cfg.num_seeds)
    coefs = np.random.default_rng(5).standard_normal(cfg.num_seeds).astype(np.float32)
    return P.DownMessage(round=rnd, client_id=cid, fingerprint=P.fingerprint(seeds), coefs=coefs,
                         lr=cfg.lr, eps=cfg.eps, local_steps=cfg.local_steps,
                         batch_size=cfg.batch_size, client_seed=P.client_rng_seed(cfg.seed, rnd, cid),
                         probs=probs, noise=noise)


def test_down_message_noise_flag_and_sizes():
    cfg = FedConfig(num_seeds=4096, local_steps=200)
    probs = np.full(4096, 1 / 4096, dtype=np.float32)
    for noise in NOISES:
        for pr in (None, probs):
            b = P.encode_down(_down(noise, cfg, pr))
            assert len(b) == 64 + 4 * 4096 * (1 if pr is None else 2)
            m = P.decode_down(b)
            assert m.noise == noise and (m.probs is None) == (pr is None)
    g, r = P.encode_down(_down("gaussian", cfg)), P.encode_down(_down("rademacher", cfg))
    assert len(g) == len(r) == 16448 and P.up_size(200, 4096) == 1232
    # a Gaussian message is what it was before the flag: flags 0, version 1; only the flag differs
    assert g[6:8] == b"\0\0" and r[6:8] == b"\2\0" and g[4:6] == r[4:6] == b"\1\0"
    assert g[:6] + g[8:] == r[:6] + r[8:]
    # the default DownMessage is Gaussian; an unknown noise is refused at encoding
    m = _down("gaussian", cfg)
    assert P.decode_down(P.encode_down(dataclasses.replace(m, noise="gaussian"))).noise == "gaussian"
    with pytest.raises(P.ProtocolError, match="noise"):
        P.encode_down(dataclasses.replace(m, noise="uniform"))
    bad = bytearray(r)
    bad[6] |= 4  # a flag this build does not know is still refused
    with pytest.raises(P.ProtocolError, match="unknown flags 0x6"):
        P.decode_down(bytes(bad))


@pytest.mark.parametrize("mine,theirs", [("gaussian", "rademacher"), ("rademacher", "gaussian")])
def test_client_refuses_another_noise(mine, theirs):
    cfg = FedConfig(num_seeds=32, local_steps=3, noise=mine)
    check_down(cfg, _down(mine, cfg))  # its own kind passes

    with pytest.raises(P.ProtocolError) as e:
        check_down(cfg, _down(theirs, cfg))
    assert repr(theirs) in str(e.value) and repr(mine) in str(e.value) and "--noise" in str(e.value)

    def loader():
        raise AssertionError("the client loaded its model for a message it must refuse")

    client = FedKSeedClient(cfg, loader, [{"instruction": "a", "input": "", "output": "b"}],
                            client_id=0)
    down = P.encode_down(_down(theirs, cfg))
    for call in (client.fit, client.evaluate):
        with pytest.raises(P.ProtocolError, match=f"noise {theirs!r}.*--noise {mine!r}"):
            call(down)


def test_client_refuses_a_workspace_of_another_noise():
    """A client whose workspace was built with another family than its config (a loader bug) refuses
    to train rather than mixing directions."""
    cfg = FedConfig(num_seeds=16, local_steps=2, noise="rademacher", rounds=1)
    from kseed.task import build_data, load_workspace

    parts, _, _ = build_data(dataclasses.replace(cfg, embedded_examples=240, min_per_client=5,
                                                 num_clients=4, clients_per_round=2))
    ws = load_workspace(dataclasses.replace(cfg, noise="gaussian"), cache=False)
    client = FedKSeedClient(cfg, lambda: ws, parts[0], client_id=0)
    with pytest.raises(P.ProtocolError, match="workspace"):
        client.fit(P.encode_down(_down("rademacher", cfg)))


# ------------------------------------------------------------------------------- end to end
def test_rademacher_run_resume_and_export(tmp_path, capsys):
    """A Rademacher run through the CLI: its config and messages carry the kind; stopped after round
    1 and resumed it ends bitwise where the uninterrupted run does; it differs from the Gaussian run;
    and its export is w0 + sum_k A_k r_k (the spec's formula, reference generator), which gives the
    run's last held-out loss again."""
    a, b, g = tmp_path / "a", tmp_path / "b", tmp_path / "g"
    rc, so, se = _run(capsys, *TINY, "--rounds", 2, "--noise", "rademacher", "--out", a)
    assert rc == 0, se
    assert _ckpt(a)["server"]["config"]["noise"] == "rademacher"
    assert _run(capsys, *TINY, "--rounds", 1, "--noise", "rademacher", "--out", b)[0] == 0
    # resume keeps the checkpoint's noise: no --noise given, and another one is refused
    rc, so, se = _run(capsys, "--out", b, "--resume", "--rounds", 2, "--noise", "gaussian",
                      "--quiet")
    assert rc == 2 and "noise='gaussian' (checkpoint: 'rademacher')" in se
    rc, so, se = _run(capsys, "--out", b, "--resume", "--rounds", 2, "--quiet")
    assert rc == 0, se
    assert _metrics(a) == _metrics(b)
    assert _ckpt(a)["server"]["acc"] == _ckpt(b)["server"]["acc"]
    assert _run(capsys, *TINY, "--rounds", 2, "--out", g)[0] == 0
    assert _ckpt(g)["server"]["config"]["noise"] == "gaussian"
    assert _ckpt(g)["server"]["acc"] != _ckpt(a)["server"]["acc"]
    assert _metrics(g)[-1]["eval_loss"] != _metrics(a)[-1]["eval_loss"]

    hf = tmp_path / "hf"
    rc, so, se = _run(capsys, "export", "--out", a, "--to", hf)
    assert rc == 0, se
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kseed.server import FedKSeedServer
    from kseed.simulation import build_data, checkpoint_config, read_checkpoint
    from kseed.task import load_workspace

    cfg = checkpoint_config(str(a))
    assert cfg.noise == "rademacher"
    server = FedKSeedServer(cfg, base_identity=load_workspace(cfg, cache=False).identity)
    server.load_state_dict(read_checkpoint(str(a))["server"])
    seeds, coefs = server.seeds, server.global_coefs()
    assert np.count_nonzero(coefs) > 0
    m = AutoModelForCausalLM.from_pretrained(str(hf), local_files_only=True)
    base, _ = M.load_model(M.EMBEDDED_DIR)
    got = dict(m.named_parameters(remove_duplicate=False))
    names = kk.ModelSeeds(base).names
    for name, w0 in base.named_parameters():
        if name not in names:
            continue
        acc = torch.zeros(w0.numel(), dtype=torch.float32)
        for s, c in zip(seeds, coefs):
            r = kk.rademacher(int(s), w0.numel(), stream=kk.stream_id(name), backend="reference")
            acc = acc + torch.tensor(float(c), dtype=torch.float32) * r
        want = (w0.detach().reshape(-1).float() + acc).reshape(w0.shape)
        assert torch.equal(got[name].detach(), want), name
    tok = AutoTokenizer.from_pretrained(str(hf), local_files_only=True)
    _, ev, _ = build_data(cfg)
    loss = M.eval_loss(m, M.tokenize_examples(tok, ev, cfg.max_length, cfg.prompt_template()),
                       tok.pad_token_id, "cpu")
    assert loss == _metrics(a)[-1]["eval_loss"]


def test_old_checkpoint_resumes_as_gaussian(tmp_path, capsys):
    """A checkpoint written before --noise existed (no noise field) resumes as the Gaussian run it
    was, bitwise."""
    from kseed.rundir import _digest, _payload

    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(capsys, *TINY, "--rounds", 2, "--out", a)[0] == 0
    assert _run(capsys, *TINY, "--rounds", 1, "--out", b)[0] == 0
    doc = _ckpt(b)
    del doc["server"]["config"]["noise"]
    doc["sha256"] = _digest(_payload(doc))
    (b / "checkpoint.json").write_text(json.dumps(doc))
    from kseed.simulation import checkpoint_config
    assert checkpoint_config(str(b)).noise == "gaussian"
    rc, so, se = _run(capsys, "--out", b, "--resume", "--rounds", 2, "--quiet")
    assert rc == 0, se
    assert _ckpt(a)["server"]["acc"] == _ckpt(b)["server"]["acc"]
    assert _metrics(a) == _metrics(b)


def test_flower_grid_round_rademacher(tmp_path):
    """The ServerApp over the in-process grid (the ClientApp's own functions answer) with
    noise=rademacher: the ClientApp builds its workspace from the run config's noise, and the run ends
    bitwise where the in-process simulation of the same config does."""
    pytest.importorskip("flwr")
    from test_flower import SMALL, InProcessGrid, _same_server_state, _task_identity

    from kseed import simulation as S
    from kseed.flower.runconfig import fed_config
    from kseed.flower.server_app import run_federation

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "flower"
        rc = dict(SMALL, rounds=1, out=str(out), noise="rademacher", **{"node-wait-timeout": 5.0})
        with _task_identity():
            run_federation(InProcessGrid(rc, 2), rc)
        sim = tmp_path / "sim"
        S.run(fed_config(rc), str(sim), progress=False)
    finally:
        torch.set_num_threads(n)
    fl, si = _ckpt(out)["server"], _ckpt(sim)["server"]
    assert fl["config"]["noise"] == si["config"]["noise"] == "rademacher"
    _same_server_state(fl, si)  # bitwise accumulators, Pro statistics, seeds and losses; acc nonzero
    assert [r["eval_loss"] for r in S.read_metrics(str(out))] == \
        [r["eval_loss"] for r in S.read_metrics(str(sim))]
