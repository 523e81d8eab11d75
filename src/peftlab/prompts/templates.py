"""Prompt templates, rendered into the text before and after the input.

A template is split around the input so that only the input is ever truncated: the
instruction and the response marker always reach the model whole.
"""

from __future__ import annotations

from peftlab.errors import PeftlabError

# Stanford Alpaca's "prompt_input" template (tatsu-lab/stanford_alpaca, train.py), as the study used.
ALPACA = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PLAIN = "{instruction}\n\n{input}\n\nAnswer:"
TEMPLATES = {"alpaca": ALPACA, "plain": PLAIN}
# What stands between the response marker and the label word. Alpaca's marker ends in a newline,
# so the word follows bare; after "Answer:" the leading space belongs to the word (lm-eval's rule).
ANSWER_PREFIX = {"alpaca": "", "plain": " ", "chat": ""}

IMDB_INSTRUCTION = "Classify the sentiment of the movie review as {choices}."
GENERIC_INSTRUCTION = "Classify the text as {choices}."
_SENTINEL = "\u2063PEFTLAB_INPUT\u2063"


def choices_text(words: list[str]) -> str:
    words = [w.strip() for w in words]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def render_template(template: str, instruction: str, tokenizer=None) -> tuple[str, str]:
    """The prompt text before and after the input, for a template name or a custom template string."""
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise PeftlabError("prompt.template=chat, but the model's tokenizer has no chat template; "
                               "use prompt.template=alpaca or give a template string")
        messages = [{"role": "user", "content": f"{instruction}\n\n{_SENTINEL}"}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        pattern = TEMPLATES.get(template, template)
        if "{input}" not in pattern:
            raise PeftlabError(f"prompt.template={template!r} is neither a known template "
                               f"({', '.join([*TEMPLATES, 'chat'])}) nor a string holding {{input}}")
        text = pattern.replace("{instruction}", instruction).replace("{input}", _SENTINEL)
    if text.count(_SENTINEL) != 1:
        raise PeftlabError(f"prompt.template={template!r} must place the input exactly once")
    prefix, suffix = text.split(_SENTINEL)
    return prefix, suffix


def answer_prefix(template: str) -> str:
    return ANSWER_PREFIX.get(template, "" if template.endswith(("\n", " ")) else " ")
