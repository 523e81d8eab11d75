"""Prompts: templates around the input text, label words, and their token ids."""

from peftlab.prompts.encoding import EncodedExample, PromptEncoder, build_prompt_encoder
from peftlab.prompts.templates import render_template

__all__ = ["EncodedExample", "PromptEncoder", "build_prompt_encoder", "render_template"]
