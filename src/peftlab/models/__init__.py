"""Models: the frozen base (hub id, folder, GGUF), its precision, and the peft method on top."""

from peftlab.models.loading import load_base_model, resolve_model_source
from peftlab.models.methods import attach_method, load_adapter, position_offset, trainable_parameters

__all__ = ["attach_method", "load_adapter", "load_base_model", "position_offset", "resolve_model_source",
           "trainable_parameters"]
