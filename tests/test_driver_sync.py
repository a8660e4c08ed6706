"""Every client's rebuilt model is bitwise the server's rebuilt global model."""
import numpy as np
import pytest
import torch

import kseed_kernels as kk
from kseed import protocol as P
from kseed.client import FedKSeedClient
from kseed.config import FedConfig
from kseed.server import FedKSeedServer
from kseed.simulation import build_data, load_workspace

from bitwise import bits


def test_clients_rebuild_bitwise_equal_to_server():
    cfg = FedConfig(rounds=3, num_clients=4, clients_per_round=2, num_seeds=24, local_steps=6,
                    lr=1e-4, eps=1e-3, batch_size=2, embedded_examples=240, min_per_client=5,
                    eval_size=8, seed=11, sampling="pro").validate()
    parts, _, _ = build_data(cfg)
    server_ws = load_workspace(cfg, cache=False)
    server = FedKSeedServer(cfg, base_identity=server_ws.identity)
    # every client has its own model copy (no shared cache): a real rebuild each time
    clients = {c: FedKSeedClient(cfg, (lambda: load_workspace(cfg, cache=False)), parts[c],
                                 client_id=c) for c in range(cfg.num_clients)}
    for rnd in (1, 2):
        ids = server.sample_clients(rnd)
        server.aggregate(rnd, {c: clients[c].fit(server.make_down(rnd, c)) for c in ids})
    coefs = server.global_coefs()
    assert np.count_nonzero(coefs) > 5
    server_ws.rebuild(server.seeds, coefs)
    want = [p.detach().clone() for p in server_ws.ms.params]
    w0 = server_ws.w0
    assert any(not torch.equal(a, b) for a, b in zip(want, w0))
    for c, cl in clients.items():
        down = server.make_down(3, c)
        cl.evaluate(down, examples=parts[c][:1])  # rebuilds from the down message
        got = cl.workspace.ms.params
        assert cl.workspace.ms.names == server_ws.ms.names
        for a, b in zip(got, want):
            assert torch.equal(bits(a.detach()), bits(b)), c
    # ...and equal to applying all K coefficients, zeros included, in one pass from w0
    full = [w.clone() for w in w0]
    kk.apply_seeds_multi_(full, list(server_ws.ms.streams), server.seeds, coefs.tolist())
    for a, b in zip(full, want):
        assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zero_coefficients_change_nothing(dtype):
    """The rebuild skips zero coefficients: bitwise the same as applying all of them."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(1000, generator=g) * 0.1).to(dtype)
    seeds = [int(x) for x in P.seed_pool(1, 16)]
    coefs = torch.randn(16, generator=g) * 1e-3
    coefs[::3] = 0.0
    coefs[1] = -0.0
    a, b = w.clone(), w.clone()
    kk.apply_seeds_(a, seeds, coefs.tolist(), stream=5)
    nz = [i for i in range(16) if coefs[i] != 0]
    kk.apply_seeds_(b, [seeds[i] for i in nz], [float(coefs[i]) for i in nz], stream=5)
    assert torch.equal(bits(a), bits(b))


def test_client_rejects_foreign_down():
    cfg = FedConfig(num_clients=2, clients_per_round=1, num_seeds=8, local_steps=2,
                    embedded_examples=80, min_per_client=2).validate()
    other = FedKSeedServer(FedConfig(num_clients=2, clients_per_round=1, num_seeds=8, seed=99))
    cl = FedKSeedClient(cfg, lambda: None, [{"instruction": "a", "input": "", "output": "b"}],
                        client_id=0)
    with pytest.raises(P.ProtocolError, match="fingerprint"):
        cl.fit(other.make_down(1, 0))
    with pytest.raises(P.ProtocolError, match="client 1"):
        cl.fit(FedKSeedServer(cfg).make_down(1, 1))
