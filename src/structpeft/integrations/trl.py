"""TRL's ``SFTTrainer`` and ``DPOTrainer`` around a structpeft model (needs ``pip install trl``).

TRL computes the loss with a fused LM head: it patches the forward of the model it trains to run the
backbone (``model.base_model``, the transformer under a ``PreTrainedModel``) and project through the
output embedding in tiles. It recognises only HF PEFT's wrapper, so a structpeft model is handed to it as
the transformers model that holds the adapters in place, and kept here for checkpoints. The fused head
reads the output embedding's weight directly, so an adapter on it would silently never act: refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from structpeft.core.layers import AdaptedLayer, ModulesToSave
from structpeft.core.model import PeftModel
from structpeft.core.targets import named_modules
from structpeft.integrations.hf_trainer import AdapterCheckpoints

try:
    import trl
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("structpeft.integrations.trl needs TRL: pip install 'structpeft[trl]'") from e


def model_for_fused_head(model: PeftModel) -> nn.Module:
    """The transformers model under ``model``, checked to have no adapter on its output embedding."""
    base = model.get_base_model()
    head = base.get_output_embeddings()
    if isinstance(head, AdaptedLayer | ModulesToSave):
        path = next(n for n, m in named_modules(base) if m is head)
        raise ValueError(
            f"module {path!r} (the LM head) carries a structpeft adapter, which TRL's fused LM head bypasses: it "
            f"would never train. Leave {path!r} out of target_modules and modules_to_save to train with TRL"
        )
    return base


def _refuse_peft_config(kwargs: dict[str, Any]) -> None:
    if kwargs.get("peft_config") is not None:
        raise ValueError("peft_config= makes TRL add an HF PEFT adapter; the structpeft model already holds its own")


class SFTTrainer(AdapterCheckpoints, trl.SFTTrainer):
    """TRL's ``SFTTrainer`` for a :class:`~structpeft.PeftModel`, with adapter checkpoints."""

    def __init__(self, model: PeftModel, *args: Any, **kwargs: Any) -> None:
        _refuse_peft_config(kwargs)
        super().__init__(model_for_fused_head(self._keep_adapter_model(model)), *args, **kwargs)
        self._refuse_sharding()


class AdaptersDisabled(nn.Module):
    """The model under a :class:`~structpeft.PeftModel` with its adapters switched off: DPO's reference
    without a second copy of the weights (what HF PEFT's ``disable_adapter()`` gives TRL for a new adapter).
    It holds no parameters of its own, so no optimizer or ``prepare`` ever touches the shared ones through
    it; its ``state_dict`` is the base model's, which TRL hashes to key cached reference log-probs."""

    def __init__(self, adapter_model: PeftModel) -> None:
        super().__init__()
        object.__setattr__(self, "adapter_model", adapter_model)  # not a submodule: its weights are the policy's

    @property
    def config(self) -> Any:
        return self.adapter_model.get_base_model().config

    @property
    def base_model(self) -> Callable[..., Any]:
        """The backbone, run with the adapters off (what TRL's fused head calls)."""
        return self._disabled(self.adapter_model.get_base_model().base_model)

    def get_output_embeddings(self) -> nn.Module:
        return self.adapter_model.get_base_model().get_output_embeddings()

    def _disabled(self, module: nn.Module) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            with self.adapter_model.disable_adapter():
                return module(*args, **kwargs)

        return run

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._disabled(self.adapter_model.get_base_model())(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {
            k: v
            for k, v in self.adapter_model.get_base_model().state_dict(*args, **kwargs).items()
            if ".adapters." not in k
        }


class DPOTrainer(AdapterCheckpoints, trl.DPOTrainer):
    """TRL's ``DPOTrainer`` for a :class:`~structpeft.PeftModel`, with adapter checkpoints. Without
    ``ref_model`` the reference is the base model: the same model with its adapters disabled. For an adapter
    already trained (SFT, then DPO), where the reference should be the adapter as it starts, pass a copy of
    that model as ``ref_model`` (HF PEFT's TRL path loads such a copy as a second adapter named "ref")."""

    def __init__(self, model: PeftModel, ref_model: nn.Module | None = None, *args: Any, **kwargs: Any) -> None:
        _refuse_peft_config(kwargs)
        adapter_model = self._keep_adapter_model(model)
        if ref_model is None:
            ref_model = AdaptersDisabled(adapter_model)
        super().__init__(model_for_fused_head(adapter_model), ref_model, *args, **kwargs)
        self._refuse_sharding()
