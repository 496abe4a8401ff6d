"""Text classifiers from the offline presets."""

from __future__ import annotations

from torch import nn

from structpeft.zoo.assets import MINILM, offline_hub

TEXT_PRESETS = {"minilm": MINILM}


def load_text_classifier(preset_or_path: str = "minilm", num_labels: int = 2) -> tuple[nn.Module, object]:
    """(model, tokenizer) for sequence classification; a preset name or a local HF folder."""
    offline_hub()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    path = TEXT_PRESETS[preset_or_path].path() if preset_or_path in TEXT_PRESETS else preset_or_path
    logging.set_verbosity_error()  # "some weights are newly initialised" is expected: the head is new
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    finally:
        logging.set_verbosity_warning()
    return model, AutoTokenizer.from_pretrained(path)
