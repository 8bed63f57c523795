"""DeepSeek Sparse Attention training on the demo model: does sparse fine-tuning keep held-out loss within 1% of
dense at contexts longer than k, and what does it do to passkey retrieval?

As DeepSeek did (a dense long-context model, then DSA training from it), in three runs of `openr2 train`, all
SFT on `needle:LENGTH` (passkey retrieval in LENGTH characters of filler: ~0.7 tokens per character with the
demo's tokenizer, so every prompt is several times longer than k):
  base   from the bundled demo model (a V3-style checkpoint), dense, --steps BASE_STEPS: the dense model
         (reused when OUT/base/model exists)
  dense  from base, --steps S: its dense self, trained on
  dsa    from base, --sparse-attention dsa --index-topk K --indexer-warmup-steps W --steps W+S
         (converted to V3.2, the indexers warmed up densely for W steps with the model frozen, then S sparse
         steps: the same number of updates of the model as the dense run)
(Started from the demo itself, which never attended to a needle, the sparse stage cannot learn retrieval: the
indexer learns to imitate an attention that ignores the needle, and the model only sees what it selects.)
Then, on the same held-out needle problems (test split): the held-out loss (mean token cross-entropy of the
assistant's reply, what SFT trains: it quotes the needle, then the passkey), the all-token loss (every token of
the held-out chats, the filler included: plain language modelling at contexts > k, which SFT did not train) and
greedy passkey accuracy (train/greedy.py, the
model's own cache) of: the dense run; the dsa run attending sparsely (its top-K keys, as trained); the dsa run
attending densely (the same weights with every key). The ratio dsa-sparse / dense of the held-out loss is the
question. --mode pretrain asks it of DeepSeek's own setting, continued pre-training (the SFT reply loss, ~0.001
nats, cannot resolve 1%: two dense seeds differ several-fold, --dense-seed2): plain needle texts, the loss on
every token of the held-out texts, the passkey's retrieval loss beside it, greedy continuation accuracy.

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/dsa_train.py [--length 400 --index-topk 64 --index-n-heads 4
      --base-steps 100 --base-lr 2e-3 --warmup-steps 20 --steps 40 --lr 5e-4 --batch-size 4 --seq-len 384
      --items 48 --out runs/bench-dsa --mode sft|pretrain --dense-seed2 --reuse
      --eval-only (score the models a previous run exported)]
Prints the two commands, a header, a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("sft", "pretrain"), default="sft",
                    help="sft: chats, loss on the reply; pretrain: plain text, loss on every token (DeepSeek's "
                         "continued pre-training, the 1%% question on a loss that is not ~0)")
    ap.add_argument("--length", type=int, default=400, help="needle haystack length in characters")
    ap.add_argument("--index-topk", type=int, default=64)
    ap.add_argument("--index-n-heads", type=int, default=4)
    ap.add_argument("--index-head-dim", type=int, default=32)
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--steps", type=int, default=40, help="steps that update the model (each run)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=384)
    ap.add_argument("--base-steps", type=int, default=100, help="the dense model's own fine-tuning from the demo")
    ap.add_argument("--base-lr", type=float, default=2e-3)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--items", type=int, default=48, help="held-out needle problems (loss and accuracy)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="runs/bench-dsa")
    ap.add_argument("--eval-only", action="store_true", help="score the models a previous run exported")
    ap.add_argument("--reuse", action="store_true", help="reuse every run whose model OUT/RUN/model exists")
    ap.add_argument("--dense-seed2", action="store_true",
                    help="also a second dense fine-tune with another seed (data order): the run-to-run noise of "
                         "the held-out loss, against which 1%% can be judged")
    args = ap.parse_args()

    from openr2.checkpoints import load_model
    from openr2.tasks.synthetic import held_out_problems
    from openr2.tokenizer import Tokenizer
    from openr2.train.run import DEMO_DIR, config_from, export_model, machine_description, train

    if args.threads:
        torch.set_num_threads(args.threads)
    common = {"mode": args.mode, "tasks": f"needle:{args.length}", "num_examples": 4000,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "warmup_steps": 10,
              "save_every": 0, "log_every": 10, "deterministic": False, "threads": args.threads}
    base_dir = os.path.join(args.out, "base")
    runs = {"base": {**common, "init_from": DEMO_DIR, "lr": args.base_lr, "steps": args.base_steps,
                     "out_dir": base_dir}}
    common = {**common, "init_from": os.path.join(base_dir, "model"), "lr": args.lr, "seed": 1}
    runs |= {
        "dense": {**common, "steps": args.steps, "out_dir": os.path.join(args.out, "dense")},
        "dsa": {**common, "steps": args.warmup_steps + args.steps, "out_dir": os.path.join(args.out, "dsa"),
                "sparse_attention": "dsa", "index_topk": args.index_topk, "indexer_warmup_steps": args.warmup_steps,
                "index_n_heads": args.index_n_heads, "index_head_dim": args.index_head_dim},
    }
    if args.dense_seed2:
        runs["dense2"] = {**runs["dense"], "seed": 2, "out_dir": os.path.join(args.out, "dense2")}
    tokenizer = Tokenizer.from_pretrained(DEMO_DIR)
    walls, models = {}, {}
    for name, values in runs.items():
        path = os.path.join(values["out_dir"], "model")
        exists = os.path.isfile(os.path.join(path, "config.json"))
        if args.eval_only or (exists and (name == "base" or args.reuse)):
            models[name] = load_model(path)
            continue
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in values.items() if k != "deterministic")
        print(f"openr2 train {flags} --no-deterministic --export {values['out_dir']}/model", flush=True)
        t0 = time.time()
        summary = train(config_from(**values))
        walls[name] = time.time() - t0
        from openr2.train.checkpoint import load_checkpoint

        export_model(load_checkpoint(values["out_dir"])["model"], tokenizer, path)
        models[name] = load_model(path)
        print(f"{name}: {summary.get('steps')} steps, {walls[name]:.0f} s", flush=True)

    problems = held_out_problems("needle", args.length, args.items, seed=1234)
    score = _score_pretrain if args.mode == "pretrain" else _score_sft
    lengths, rows = score(models, problems, tokenizer, args.index_topk)
    base = rows["dense fine-tune"]["held_out_loss"]
    base_lm = rows["dense fine-tune"]["all_token_loss"]
    print(f"\n# {machine_description()}; load: shared with other sessions' jobs (see BENCHMARKS.md)")
    print(f"# {args.mode}, needle:{args.length}: sequences of {lengths[0]}-{lengths[-1]} tokens, k = {args.index_topk}; "
          f"{len(problems)} held-out problems; {args.steps} model-updating steps each "
          f"(+{args.warmup_steps} indexer warm-up), batch {args.batch_size}")
    second = "answer loss" if args.mode == "pretrain" else "all-token loss"
    print(f"{'model':32s} {'held-out loss':>14s} {'vs dense':>9s} {second:>15s} {'vs dense':>9s} "
          f"{'needle acc':>11s}")
    for label, r in rows.items():
        print(f"{label:32s} {r['held_out_loss']:14.5f} {r['held_out_loss'] / base:9.4f} {r['all_token_loss']:15.4f} "
              f"{r['all_token_loss'] / base_lm:9.4f} {r['needle_accuracy']:11.3f}")
    sparse_row = rows[f"dsa, sparse (top-{args.index_topk})"]
    ratio = sparse_row["held_out_loss"] / base
    print(json.dumps({"bench": "dsa_train", "mode": args.mode, "length": args.length, "index_topk": args.index_topk,
                      "prompt_tokens": [lengths[0], lengths[-1]], "steps": args.steps,
                      "warmup_steps": args.warmup_steps, "rows": rows, "sparse_over_dense_loss": ratio,
                      "sparse_over_dense_all_token_loss": sparse_row["all_token_loss"] / base_lm,
                      "wall_s": walls}))


def _variants(models, index_topk):
    out = [("base (dense, before)", models["base"], False), ("dense fine-tune", models["dense"], False),
           (f"dsa, sparse (top-{index_topk})", models["dsa"], False), ("dsa, dense (same weights)", models["dsa"], True)]
    if "dense2" in models:
        out.insert(2, ("dense fine-tune, seed 2", models["dense2"], False))
    return out


def _score_sft(models, problems, tokenizer, index_topk):
    """held-out loss = the replies' tokens (what SFT trains); all-token = every token of the chats; needle accuracy
    = greedy chat answers through the model's own cache."""
    from openr2.train.data import SFTDataset, sft_example
    from openr2.train.dsa_loss import dense_attention
    from openr2.train.evaluate import held_out_loss
    from openr2.train.greedy import greedy_accuracy

    examples = [sft_example(p, tokenizer) for p in problems]
    lengths = sorted(len(ids) for ids, _ in examples)
    batches = list(SFTDataset(examples, 8, max(lengths), tokenizer.pad_token_id, shuffle=False, epochs=1,
                              drop_last=False))
    # every token of the held-out chats (prompt filler included): the plain LM loss at contexts > k
    all_tokens = [(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])) for ids, _ in examples]
    rows = {}
    for label, model, dense in _variants(models, index_topk):
        with dense_attention(model) if dense else _nothing(), torch.no_grad():
            loss = held_out_loss(model, batches)
            lm_loss = held_out_loss(model, all_tokens)
            accuracy, _ = greedy_accuracy(model, tokenizer, problems, max_tokens=40)
        rows[label] = {"held_out_loss": loss, "all_token_loss": lm_loss, "needle_accuracy": accuracy}
    return lengths, rows


def _score_pretrain(models, problems, tokenizer, index_topk):
    """held-out loss = every token of the held-out texts (train/data.to_text, one text per sequence, as pretraining
    reads them); answer loss = the passkey's tokens where the text after the question first quotes it (what only
    retrieval from the haystack predicts; the final "The answer is" copies it from the line before), in the
    all-token column's place; needle accuracy = the greedy continuation of
    "HAYSTACK\nWhat is the passkey?\n" through the model's own cache contains "The answer is PASSKEY"."""
    from openr2.tasks.needle import QUESTION
    from openr2.train.data import IGNORE_INDEX, to_text
    from openr2.train.dsa_loss import dense_attention
    from openr2.train.evaluate import held_out_loss
    from openr2.train.greedy import greedy_completion

    texts, answers = [], []
    for p in problems:
        text = to_text(p)
        ids = tokenizer.encode(text) + [tokenizer.eos_token_id]
        at = text.index(p.answer, text.index(QUESTION))  # the passkey as the reply first quotes it: retrieved
        start, end = (len(tokenizer.encode(text[:i])) for i in (at, at + len(p.answer)))  # (prefix-stable here)
        labels = [IGNORE_INDEX] * (start - 1) + ids[start:end] + [IGNORE_INDEX] * (len(ids) - end)
        texts.append(ids)
        answers.append((torch.tensor([ids[:-1]]), torch.tensor([labels])))
    lengths = sorted(len(ids) for ids in texts)
    batches = [(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])) for ids in texts]
    rows = {}
    for label, model, dense in _variants(models, index_topk):
        with dense_attention(model) if dense else _nothing(), torch.no_grad():
            loss = held_out_loss(model, batches)
            answer_loss = held_out_loss(model, answers)
            model.eval()
            hits = 0
            for p in problems:
                out = greedy_completion(model, tokenizer, tokenizer.encode(f"{p.prompt}\n"), 40)
                hits += f"The answer is {p.answer}" in tokenizer.decode(out)
        rows[label] = {"held_out_loss": loss, "all_token_loss": answer_loss, "answer_loss": answer_loss,
                       "needle_accuracy": hits / len(problems)}
    return lengths, rows


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
