"""Tiny random models of several architectures and two more tokenizer styles (no download).

The architectures differ where peftlab's mechanism can go wrong: Gemma 3 (sliding-window layers
shorter than the prompt, embeddings scaled by sqrt(hidden), a tied LM head, final logit soft-capping),
Qwen2 (biased q/k/v projections) and GPT-2 (learned absolute positions, one fused `c_attn`
Conv1D, so peft's default LoRA targets are not q_proj/v_proj).
"""

from __future__ import annotations

import torch

from tests.conftest import FILLER, WORDS_NEG, WORDS_POS

ARCHITECTURES = ("llama", "gemma3", "qwen2", "gpt2")
SPECIAL = {"unk": 0, "bos": 1, "eos": 2, "pad": 3}


def build_tokenizer(bos: bool):
    """A GPT-2-style byte-level BPE; with `bos`, its post-processor puts <s> in front as LLaMA/Gemma do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from peftlab.prompts.templates import ALPACA, IMDB_INSTRUCTION

    corpus = [ALPACA, IMDB_INSTRUCTION, "positive negative neutral good bad Answer: terrible poor excellent"] + \
        [" ".join(WORDS_POS + WORDS_NEG + FILLER)] * 5
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", SPECIAL["bos"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                       pad_token="<pad>")
    # GPT-2 style: no BOS, EOS doubles as padding (peftlab's loader does the same for such tokenizers).
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>")


def build_model(arch: str, vocab_size: int, seed: int = 0):
    """A 2-layer random model of `arch` in eval mode, fp32."""
    import transformers as tf

    torch.manual_seed(seed)
    ids = dict(pad_token_id=SPECIAL["pad"], bos_token_id=SPECIAL["bos"], eos_token_id=SPECIAL["eos"])
    if arch == "llama":
        config = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, **ids)
    elif arch == "gemma3":
        # sliding_window 8 is shorter than the Alpaca instruction: the shared prefix cache and every row
        # cross the window. Layer 0 slides, layer 1 is global (Gemma 3 alternates 5 sliding : 1 global).
        config = tf.Gemma3TextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                                     final_logit_softcapping=30.0, tie_word_embeddings=True, **ids)
    elif arch == "qwen2":
        config = tf.Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **ids)
    elif arch == "gpt2":
        config = tf.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=1024,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    else:
        raise ValueError(arch)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    if arch == "gemma3":  # random init leaves the scale-like norm weights at 0 (1 + w): make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.3)
    return model


def save_model(folder, arch: str, bos: bool):
    tokenizer = build_tokenizer(bos)
    model = build_model(arch, len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
