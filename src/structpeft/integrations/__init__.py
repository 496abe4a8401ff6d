"""Trainers from other libraries around a structpeft model.

- :class:`Trainer`: transformers' ``Trainer`` that saves, resumes from and reloads (``load_best_model_at_end``)
  adapter checkpoints in structpeft's layout (``adapter_config.json`` + ``adapter_model.safetensors``) in
  each ``checkpoint-N`` folder, tied embeddings included.
- :class:`SFTTrainer` and :class:`DPOTrainer` (``structpeft.integrations.trl``, needs ``pip install trl``):
  TRL's trainers, the same checkpoints, TRL's fused LM head on the model under the adapters, and DPO's
  reference computed with the adapters disabled (no second copy of the model).

Each takes the :class:`~structpeft.PeftModel` as ``model=``; everything else is passed on unchanged.
"""

from structpeft.integrations.hf_trainer import AdapterCheckpoints, Trainer

__all__ = ["AdapterCheckpoints", "Trainer"]
