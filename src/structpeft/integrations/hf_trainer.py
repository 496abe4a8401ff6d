"""transformers' ``Trainer`` with adapter checkpoints in structpeft's layout.

The stock ``Trainer`` knows how to checkpoint a ``PreTrainedModel`` or an HF PEFT model; any other module it
saves as one safetensors state dict, which refuses tied embeddings ("Some tensors share memory"), holds the
whole frozen base, and cannot be resumed or reloaded as an adapter. :class:`AdapterCheckpoints` replaces the
three places the ``Trainer`` writes and reads model weights.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers.utils import can_return_loss, find_labels

from structpeft.core.checkpoint import CONFIG_NAME
from structpeft.core.model import DEFAULT_ADAPTER, PeftModel

TRAINING_ARGS_NAME = "training_args.bin"  # the name transformers' Trainer gives its pickled arguments


def adapter_folder(checkpoint: str | os.PathLike, adapter: str) -> Path:
    """Where ``save_pretrained`` puts ``adapter`` inside ``checkpoint`` (HF PEFT's layout)."""
    return Path(checkpoint) if adapter == DEFAULT_ADAPTER else Path(checkpoint) / adapter


class AdapterCheckpoints:
    """Mixin for a ``transformers.Trainer`` subclass training a :class:`~structpeft.PeftModel`.

    Every checkpoint folder (``checkpoint-N``, ``save_model()``) holds the adapters as ``save_pretrained``
    writes them; ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end`` load them back into the
    model in place. The frozen base model is never written.
    """

    adapter_model: PeftModel

    def _keep_adapter_model(self, model: Any) -> PeftModel:
        if not isinstance(model, PeftModel):
            raise TypeError(
                f"{type(self).__name__} trains a structpeft model: pass model=sp.get_peft_model(base, config), "
                f"not a {type(model).__name__}"
            )
        base = model.get_base_model()
        if str(getattr(base, "quantization_method", "")) in ("gguf", "QuantizationMethod.GGUF"):
            from structpeft.zoo.gguf import unmark_quantized

            # Loaded with from_pretrained(..., gguf_file=): dequantized to float, yet marked quantized,
            # which makes the Trainer refuse it. The weights are plain float tensors: drop the mark.
            unmark_quantized(base)
        self.adapter_model = model
        return model

    def _refuse_sharding(self) -> None:
        """FSDP and DeepSpeed shard or partition the parameters and hand ``_save`` a gathered state dict (or
        never call it); the adapter checkpoints here read whole parameters from the model. Refused until
        they gather too, rather than writing empty or wrong adapters."""
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            raise ValueError(
                f"{type(self).__name__} does not yet checkpoint adapters under FSDP or DeepSpeed; train a structpeft "
                "model sharded with `structpeft finetune` under torchrun (FSDP2) or your own loop, or use DDP here"
            )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        del state_dict  # the adapters are read from the model, as save_pretrained does (sharding is refused)
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.adapter_model.save_pretrained(output_dir)
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_adapters(self, checkpoint: str | os.PathLike) -> None:
        for adapter in self.adapter_model.peft_config:
            folder = adapter_folder(checkpoint, adapter)
            if not (folder / CONFIG_NAME).is_file():
                raise FileNotFoundError(
                    f"{checkpoint} holds no saved adapter {adapter!r} (no {folder / CONFIG_NAME}); was it written by "
                    "a structpeft trainer?"
                )
            self.adapter_model.load_adapter_weights(folder, adapter)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        del model
        self._load_adapters(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if not any((adapter_folder(best, a) / CONFIG_NAME).is_file() for a in self.adapter_model.peft_config):
            # as the stock Trainer does: a node without the checkpoint (multi-node, no save_on_each_node)
            warnings.warn(f"could not load the best model: {best} holds no adapter; keeping the last one", stacklevel=2)
            return
        self._load_adapters(best)


class Trainer(AdapterCheckpoints, transformers.Trainer):
    """``transformers.Trainer`` for a :class:`~structpeft.PeftModel`, with adapter checkpoints."""

    def __init__(self, model: PeftModel, *args: Any, **kwargs: Any) -> None:
        super().__init__(self._keep_adapter_model(model), *args, **kwargs)
        self._refuse_sharding()
        # The Trainer reads which inputs are labels, and whether the model returns a loss, off the model's
        # class; the wrapper forwards any keyword, so ask the transformers class under it.
        base_class = type(model.get_base_model())
        if self.args.label_names is None:
            self.label_names = find_labels(base_class)
        self.can_return_loss = can_return_loss(base_class)
