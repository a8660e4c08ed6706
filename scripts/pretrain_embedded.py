#!/usr/bin/env python
"""Build the embedded default of kseed-fed: a tokenizer, a small LLaMA-architecture model, and its
pre-training on synthetic text, written to python/kseed/data/embedded/ (or --out).

The base model is pre-trained on the synthetic world in a *plain* question/answer format
("Question: ...\\nAnswer: ...") plus the same facts as running text; the federated run then fine-tunes it
to the Alpaca instruction format (kseed.datasets.format_prompt), evaluated on a category it never sees in
that format during the federated run (summarization). Everything is deterministic in --seed.

    python scripts/pretrain_embedded.py            # ~2-3 minutes on 2 CPU cores
"""
import argparse
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

import torch  # noqa: E402

from kseed import datasets as D  # noqa: E402

EOS, PAD, BOS, UNK = "</s>", "<pad>", "<s>", "<unk>"


def plain_text(ex: dict) -> str:
    q = ex["instruction"] + ("\n" + ex["input"] if ex["input"] else "")
    return f"Question: {q}\nAnswer: {ex['output']}"


def build_tokenizer(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer(tok, out: str, max_len: int):
    from transformers import PreTrainedTokenizerFast
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, unk_token=UNK, model_max_length=max_len)
    fast.save_pretrained(out)
    return fast


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "..", "python", "kseed", "data", "embedded"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--prompt", default="alpaca", choices=["alpaca", "reference"],
                    help="the instruction template the tokenizer (and --alpaca-fraction of the "
                         "pre-training) sees; kseed-fed's --prompt auto uses alpaca for the embedded "
                         "model, so rebuild with the default to keep the two in step")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--alpaca-fraction", type=float, default=0.0,
                    help="fraction of pre-training examples in the Alpaca format (default 0)")
    args = ap.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.time()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    corpus = D.generate_embedded(20000, seed=args.seed + 1)
    tok_texts = [plain_text(e) for e in corpus[:4000]]
    tok_texts += [D.format_prompt(e, args.prompt) + e["output"] for e in corpus[4000:6000]]
    tok = build_tokenizer(tok_texts, args.vocab_size)
    os.makedirs(args.out, exist_ok=True)
    fast = save_tokenizer(tok, args.out, 256)
    eos_id = fast.convert_tokens_to_ids(EOS)
    pad_id = fast.convert_tokens_to_ids(PAD)
    bos_id = fast.convert_tokens_to_ids(BOS)

    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=bos_id, eos_token_id=eos_id,
                      pad_token_id=pad_id, rms_norm_eps=1e-5, attention_dropout=0.0)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters; vocab {len(fast)}")

    def encode(ex):
        if rng.random() < args.alpaca_fraction:
            text = D.format_prompt(ex, args.prompt) + ex["output"]
        else:
            text = plain_text(ex)
        return fast(text, add_special_tokens=False)["input_ids"][:127] + [eos_id]

    seqs = [encode(e) for e in corpus]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps,
                                                pct_start=0.1)
    model.train()
    for step in range(args.steps):
        batch = [seqs[rng.randrange(len(seqs))] for _ in range(args.batch_size)]
        n = max(map(len, batch))
        ids = torch.full((len(batch), n), pad_id)
        labels = torch.full((len(batch), n), -100)
        att = torch.zeros((len(batch), n), dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, :len(s)] = torch.tensor(s)
            labels[i, :len(s)] = torch.tensor(s)
            att[i, :len(s)] = 1
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    model.generation_config.pad_token_id = pad_id
    model.save_pretrained(args.out, safe_serialization=True)
    with open(os.path.join(args.out, "kseed_embedded.json"), "w") as f:
        json.dump({"builder": "scripts/pretrain_embedded.py", "args": vars(args) | {"out": None},
                   "parameters": n_params, "seconds": round(time.time() - t0, 1)}, f, indent=1)
    print(f"saved to {args.out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
