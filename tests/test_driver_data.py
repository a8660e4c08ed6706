"""Dolly and Natural Instructions fixtures, the Alpaca prompt, and the partitions."""
import json
import os
from collections import Counter

import pytest

from kseed import datasets as D
from kseed import modeling as M

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
DOLLY = os.path.join(FIX, "dolly_small.jsonl")
NI = os.path.join(FIX, "ni")


def test_dolly_load_heldout_and_prompt():
    ex = D.load_dolly(DOLLY)
    assert len(ex) == 96 and set(ex[0]) == {"instruction", "input", "output", "category"}
    train, test, held = D.split_heldout_category(ex)
    cats = sorted({e["category"] for e in ex})
    assert held == cats[7] == "summarization"
    assert len(test) == 12 and all(e["category"] == held for e in test)
    assert all(e["category"] != held for e in train)
    with_ctx = next(e for e in ex if e["input"])
    no_ctx = next(e for e in ex if not e["input"])
    # the default: the reference code's Dolly/NI template, exactly, no newline after "Response:"
    assert D.format_prompt(with_ctx) == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response for the task request.\n\n### Instruction:\n"
        + with_ctx["instruction"] + "\n\n### Input:\n" + with_ctx["input"] + "\n\n### Response:")
    assert D.format_prompt(no_ctx) == (
        "Below is an instruction that describes a task. Write a response for the task request.\n\n"
        "### Instruction:\n" + no_ctx["instruction"] + "\n\n### Response:")
    # --prompt alpaca: the standard Alpaca wording with its trailing newline
    p = D.format_prompt(with_ctx, "alpaca")
    assert "appropriately completes the request" in p
    assert "### Input:\n" + with_ctx["input"] in p and p.endswith("### Response:\n")
    assert "### Input" not in D.format_prompt(no_ctx, "alpaca")
    with pytest.raises(ValueError, match="prompt template"):
        D.format_prompt(no_ctx, "chatml")


def test_dirichlet_minimum_and_iid():
    ex = D.load_dolly(DOLLY)
    train, _, _ = D.split_heldout_category(ex)
    cats = [e["category"] for e in train]
    parts = D.partition_dirichlet(cats, 5, 0.5, seed=3, min_per_client=8)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(len(train)))  # a partition: every example once
    assert min(len(p) for p in parts) >= 8
    assert parts == D.partition_dirichlet(cats, 5, 0.5, seed=3, min_per_client=8)
    # non-IID: category mixes differ between clients
    mixes = [Counter(cats[i] for i in p) for p in parts]
    assert len({tuple(sorted(m.items())) for m in mixes}) > 1
    iid = D.partition_iid(len(train), 7, seed=1)
    assert sorted(i for p in iid for i in p) == list(range(len(train)))
    assert max(map(len, iid)) - min(map(len, iid)) <= 1
    with pytest.raises(D.DataError, match="at least 30"):
        D.partition_dirichlet(cats, 5, 0.5, seed=3, min_per_client=30)
    # --min-per-client 0 with a sparse split: still no empty client (a client needs data to train)
    for seed in range(20):
        sparse = D.partition_dirichlet(cats, 12, 0.1, seed=seed, min_per_client=0)
        assert min(len(p) for p in sparse) >= 1
        assert sorted(i for p in sparse for i in p) == list(range(len(train)))


def test_paper_scale_clients_on_the_embedded_data():
    """200 clients (the paper's scale): the embedded default's 2,000 examples are too few for 10 each,
    and the error says how to get more; with --embedded-examples 15000 every client has its 10."""
    from kseed.config import FedConfig
    from kseed.task import build_data

    with pytest.raises(D.DataError, match="--embedded-examples"):
        build_data(FedConfig(num_clients=200, clients_per_round=10).validate())
    parts, _, _ = build_data(FedConfig(num_clients=200, clients_per_round=10,
                                       embedded_examples=15000).validate())
    assert len(parts) == 200 and min(map(len, parts)) >= 10


def test_ni_one_client_per_task():
    parts, test = D.load_natural_instructions(NI, seed=0)
    # task004_tiny (8 instances) is skipped; 20 % of each other training task
    assert [len(p) for p in parts] == [5, 6, 4]
    assert [p[0]["category"] for p in parts] == ["task001_copy_word", "task002_count_words",
                                                 "task003_first_word"]
    assert all(e["instruction"].startswith("Definition of") for p in parts for e in p)
    # test tasks: max(20, 2 %) instances each
    assert Counter(e["category"] for e in test) == {"task101_last_word": 20, "task102_upper": 20}


def test_bad_data_errors(tmp_path):
    with pytest.raises(D.DataError, match="not found"):
        D.load_dolly(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "response": "y", "category": "c"}\n{not json\n')
    with pytest.raises(D.DataError, match="bad.jsonl:2"):
        D.load_dolly(str(bad))
    bad.write_text(json.dumps({"instruction": "x", "category": "c"}) + "\n")
    with pytest.raises(D.DataError, match="response"):
        D.load_dolly(str(bad))
    with pytest.raises(D.DataError, match="not found"):
        D.load_natural_instructions(str(tmp_path))


def test_embedded_generator_and_tokenizer():
    ex = D.generate_embedded(80, seed=5)
    assert ex == D.generate_embedded(80, seed=5)
    assert Counter(e["category"] for e in ex) == {c: 10 for c in D.EMBEDDED_CATEGORIES}
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(M.EMBEDDED_DIR, local_files_only=True)
    items = M.tokenize_examples(tok, ex[:4], 64)
    for (ids, npr), e in zip(items, ex):
        assert len(ids) <= 64 and ids[-1] == tok.eos_token_id
        assert tok.decode(ids[npr:-1]) == e["output"]
    for (ids, npr), e in zip(M.tokenize_examples(tok, ex[:4], 512), ex):
        # reference: prompt and response tokenized as one text, the response appended directly
        joint = tok(D.format_prompt(e) + e["output"], add_special_tokens=False)["input_ids"]
        assert ids[:-1] == ([tok.bos_token_id] if tok.bos_token_id is not None else []) + joint
        assert tok.decode(ids[:npr], skip_special_tokens=True) == D.format_prompt(e)
    for (ids, npr), e in zip(M.tokenize_examples(tok, ex[:4], 512, "alpaca"), ex):
        assert tok.decode(ids[:npr], skip_special_tokens=True) == D.format_prompt(e, "alpaca")
        assert tok.decode(ids[npr:-1]) == e["output"]
    ids, att, labels = M.collate(items, tok.pad_token_id, "cpu")
    assert (labels[0, :items[0][1]] == -100).all() and (labels[0, items[0][1]:len(items[0][0])] >= 0).all()


def test_prompt_auto_follows_the_data():
    """--prompt auto (the default): the reference code's template for Dolly and NI, the Alpaca wording
    for the embedded model (its tokenizer was built on it); an explicit choice always wins."""
    from kseed.config import FedConfig
    assert FedConfig().prompt == "auto"
    assert FedConfig(dataset="embedded").prompt_template() == "alpaca"
    assert FedConfig(dataset="dolly").prompt_template() == "reference"
    assert FedConfig(dataset="ni").prompt_template() == "reference"
    for style in ("reference", "alpaca"):
        for ds in ("embedded", "dolly", "ni"):
            assert FedConfig(dataset=ds, prompt=style).prompt_template() == style
    with pytest.raises(ValueError, match="prompt"):
        FedConfig(prompt="chatml").validate()
