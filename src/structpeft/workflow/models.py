"""Models for a task: offline presets, local HF folders, GGUF files and hub ids, each with its new head found.

The head (the module a classification task trains from scratch, kept whole as ``modules_to_save``)
comes from the model: for transformers models it is what ``from_pretrained`` reports as newly
initialised; for the plain-torch presets the preset names it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from structpeft.workflow.tasks import Task

FAMILIES = ("text-encoder", "convnet", "vit", "decoder")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelError(ValueError):
    """A model that cannot be loaded for the task: the message names it and the fix."""


@dataclass
class LoadedModel:
    model: nn.Module
    ref: str
    family: str  # one of FAMILIES: picks the recipes' defaults
    head: list[str] = field(default_factory=list)  # module names trained whole (a new classifier)
    tokenizer: Any = None
    image_size: int | None = None
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD
    keyword_inputs: bool = True  # transformers models: model(**batch).logits; plain torch: model(pixels)

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``model`` (this model, possibly wrapped) on a batch, to logits."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs).logits if self.keyword_inputs else model(inputs["pixel_values"])


@dataclass(frozen=True)
class Preset:
    kind: str  # the task kind it serves
    load: Callable[[Task], LoadedModel] | None  # None for a GGUF preset: its file is read like any GGUF
    about: str
    gguf: Callable[[], Path] | None = None  # where a GGUF preset's file is


def _minilm(task: Task) -> LoadedModel:
    from structpeft.zoo.assets import MINILM, offline_hub

    offline_hub()
    loaded = _transformers_model(str(MINILM.path()), task)
    loaded.ref = "minilm"
    return loaded


def _torch_convnet(ref: str, load: Callable[[int], nn.Module], head: str) -> Callable[[Task], LoadedModel]:
    def build(task: Task) -> LoadedModel:
        return LoadedModel(load(task.num_labels), ref, "convnet", [head], image_size=112, keyword_inputs=False)

    return build


def _mobilenet_v2(num_classes: int) -> nn.Module:
    from structpeft.zoo.mobilenet_v2 import load_mobilenet_v2

    return load_mobilenet_v2(num_classes)


def _efficientnet_lite0(num_classes: int) -> nn.Module:
    from structpeft.zoo.efficientnet_lite import load_efficientnet_lite0

    return load_efficientnet_lite0(num_classes)


def _dinov2_small(task: Task) -> LoadedModel:
    """The DINOv2-S/14 backbone under transformers' image-classification head (class token and
    mean patch token, concatenated, into a new linear layer)."""
    from transformers import Dinov2ForImageClassification

    from structpeft.zoo.dinov2 import load_dinov2_small

    backbone = load_dinov2_small(image_size=112)
    config = backbone.config
    config.image_size = 518  # the size its position embeddings were trained at; inputs are interpolated
    config.num_labels = task.num_labels
    config.id2label = dict(enumerate(task.label_names or []))
    config.label2id = {v: k for k, v in config.id2label.items()}
    model = Dinov2ForImageClassification(config)
    model.dinov2.load_state_dict(backbone.state_dict())
    model.config.image_size = 112
    return LoadedModel(model, "dinov2_small", "vit", ["classifier"], image_size=112)


def _smollm2_path() -> Path:
    from structpeft.zoo.gguf import SMOLLM2_135M

    return SMOLLM2_135M.path()


def _gemma3_path() -> Path:
    from structpeft.zoo.gguf import gemma3_270m_path

    return gemma3_270m_path()


def _gguf_model(path: Path, task: Task, quantized: Any = None, ref: str | None = None) -> LoadedModel:
    """A GGUF decoder, converted to a float checkpoint once (cached by the file's content) and loaded from it."""
    from structpeft.zoo.assets import offline_hub
    from structpeft.zoo.gguf import cache_folder, convert_gguf, is_converted

    if task.kind != "causal-lm":
        raise ModelError(f"{path}: a GGUF file holds a decoder LLM, for causal-lm tasks; {task.name} is {task.kind}")
    offline_hub()
    folder = cache_folder(path)
    if not is_converted(folder):
        print(f"model: {path.name}: converting the GGUF to float (once per file)...", file=sys.stderr, flush=True)
    converted = convert_gguf(path, folder)
    how = "converted and cached in" if converted.converted_now else "read from the cache"
    print(f"model: {path.name}: {how} {converted.folder}", file=sys.stderr, flush=True)
    loaded = _transformers_model(str(converted.folder), task, quantized)
    loaded.ref = ref or str(path)
    return loaded


PRESETS: dict[str, Preset] = {
    "minilm": Preset("text-classification", _minilm, "all-MiniLM-L6-v2, a 6-layer BERT (22.7M)"),
    "mobilenet_v2": Preset(
        "image-classification", _torch_convnet("mobilenet_v2", _mobilenet_v2, "classifier.1"), "MobileNetV2 (3.5M)"
    ),
    "efficientnet_lite0": Preset(
        "image-classification", _torch_convnet("efficientnet_lite0", _efficientnet_lite0, "_fc"), "EfficientNet-Lite0"
    ),
    "dinov2_small": Preset("image-classification", _dinov2_small, "DINOv2-S/14 ViT (22.1M, 6 heads)"),
    "smollm2-135m": Preset("causal-lm", None, "SmolLM2-135M-Instruct (LLaMA, 30 layers, GGUF)", _smollm2_path),
    "gemma3-270m": Preset("causal-lm", None, "Gemma 3 270M base (18 layers, GGUF)", _gemma3_path),
}


def check_model_ref(ref: str) -> None:
    """Fail fast (before any data or weights load) on a model that names nothing loadable."""
    if ref in PRESETS:
        return
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{ref}: a model folder needs a config.json (a folder saved with save_pretrained)")
        return
    if path.is_file():
        from structpeft.zoo.gguf import is_gguf

        if not is_gguf(path):
            raise ModelError(
                f"{ref}: a model file must be a GGUF (.gguf); otherwise give a preset, a folder or a hub id"
            )
        return
    if path.exists():
        raise ModelError(f"{ref}: a model is a preset, a folder, a GGUF file or a hub id")
    if ref.startswith((".", "/", "~")) or not _HUB_ID.match(ref):
        raise ModelError(f"unknown model {ref!r}: not a preset ({', '.join(PRESETS)}) and no such folder")


def gguf_file(ref: str) -> Path | None:
    """The GGUF file behind a model reference (a GGUF preset or a .gguf path), else None."""
    if ref in PRESETS:
        locate = PRESETS[ref].gguf
        return None if locate is None else locate()
    path = Path(ref).expanduser()
    return path if path.is_file() else None


QUANTIZATIONS = ("nf4", "fp4", "int8")


def quantization_config(quantize: str, compute_dtype: torch.dtype | None = None) -> Any:
    """bitsandbytes' config for ``--quantize``: NF4 / FP4 with double quantization (QLoRA's), or int8."""
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantize,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or torch.float32,
    )


def load_model(
    ref: str, task: Task, quantize: str | None = None, compute_dtype: torch.dtype | None = None
) -> LoadedModel:
    """``ref`` (a preset, a local HF folder, a GGUF file or a hub id) ready for ``task``, with a new head;
    ``quantize`` (nf4, fp4, int8) loads its linear layers quantized by bitsandbytes."""
    check_model_ref(ref)
    quantized = None if quantize is None else quantization_config(quantize, compute_dtype)
    if ref in PRESETS:
        preset = PRESETS[ref]
        if preset.kind != task.kind:
            raise ModelError(f"the preset {ref} is for {preset.kind}, and {task.name} is a {task.kind} task")
        if preset.gguf is not None:
            return _gguf_model(preset.gguf(), task, quantized, ref)
        if quantized is not None:
            raise ModelError(f"--quantize takes a transformers model or a GGUF decoder; {ref} is neither")
        return preset.load(task)
    if Path(ref).expanduser().is_file():
        return _gguf_model(Path(ref).expanduser(), task, quantized)
    return _transformers_model(ref, task, quantized)


def _family(config: Any, kind: str) -> str:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if kind == "image-classification":
        return "vit" if hasattr(config, "num_attention_heads") else "convnet"
    if (
        config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    ):
        return "decoder"
    return "text-encoder"


def _transformers_model(ref: str, task: Task, quantized: Any = None) -> LoadedModel:
    import transformers
    from transformers.utils import logging

    auto = {
        "text-classification": transformers.AutoModelForSequenceClassification,
        "image-classification": transformers.AutoModelForImageClassification,
        "causal-lm": transformers.AutoModelForCausalLM,
    }[task.kind]
    kwargs: dict[str, Any] = {}
    if task.kind != "causal-lm":
        id2label = dict(enumerate(task.label_names or []))
        kwargs = {
            "num_labels": task.num_labels,
            "id2label": id2label,
            "label2id": {v: k for k, v in id2label.items()},
            "ignore_mismatched_sizes": True,  # a fine-tuned checkpoint with other classes gets a new head
        }
    if quantized is not None:  # bitsandbytes quantizes the linear layers as they load, on the CPU
        kwargs |= {"quantization_config": quantized, "device_map": "cpu", "dtype": torch.float32}
    logging.set_verbosity_error()  # "some weights are newly initialised" is expected: the head is new
    logging.disable_progress_bar()  # a bar per load is noise between our own lines
    try:
        model, info = auto.from_pretrained(ref, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load {ref!r} for {task.kind}: {str(e).splitlines()[0]}") from e
    finally:
        logging.set_verbosity_warning()
        logging.enable_progress_bar()
    if quantized is None:
        model.float()  # a quantized model refuses .float(); it loaded with float32 for what is not quantized
    loaded = LoadedModel(model, ref, _family(model.config, task.kind))
    if task.kind != "causal-lm":
        loaded.head = find_head(model, info, task.num_labels)
        if quantized is not None:
            _float_head(model, loaded.head)
    if task.kind == "image-classification":
        _image_settings(loaded, ref)
    else:
        loaded.tokenizer = transformers.AutoTokenizer.from_pretrained(ref)
        if loaded.tokenizer.pad_token is None:  # decoders often have none; padding is masked anyway
            loaded.tokenizer.pad_token = loaded.tokenizer.eos_token
        model.config.pad_token_id = loaded.tokenizer.pad_token_id
    return loaded


def _float_head(model: nn.Module, head: list[str]) -> None:
    """Under ``--quantize`` bitsandbytes gives a new classifier its 4-bit or 8-bit layer class, but the weights,
    never in the checkpoint, stay unquantized floats that its kernels cannot read: the head, trained whole,
    becomes the plain float ``nn.Linear`` it really is."""
    for name in head:
        for child_name, module in list(model.get_submodule(name).named_modules()):
            quantized_class = isinstance(module, nn.Linear) and type(module) is not nn.Linear
            if not quantized_class or not module.weight.dtype.is_floating_point:
                continue
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight = nn.Parameter(module.weight.data.float())
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.data.float())
            full = f"{name}.{child_name}" if child_name else name
            parent, _, attr = full.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, linear)


def find_head(model: nn.Module, loading_info: dict[str, list], num_labels: int) -> list[str]:
    """The modules holding the weights ``from_pretrained`` initialised anew (the classifier); for a
    checkpoint whose head fits already, the last linear layer with ``num_labels`` outputs."""
    new = [k for k in loading_info.get("missing_keys", []) if k.endswith((".weight", ".bias"))]
    new += [k[0] if isinstance(k, tuple) else k for k in loading_info.get("mismatched_keys", [])]
    heads = sorted({k.rsplit(".", 1)[0] for k in new})
    if heads:
        return heads
    fitting = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_labels]
    if not fitting:
        raise ModelError(f"{type(model).__name__}: no classification head with {num_labels} outputs found")
    return fitting[-1:]


def _image_settings(loaded: LoadedModel, ref: str) -> None:
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(ref)
    except (OSError, ValueError):
        processor = None  # no preprocessor_config.json: ImageNet statistics, the config's image size
    size = getattr(processor, "size", None) or {}
    loaded.image_size = (
        size.get("height") or size.get("shortest_edge") or getattr(loaded.model.config, "image_size", 224)
    )
    loaded.image_mean = tuple(getattr(processor, "image_mean", None) or IMAGENET_MEAN)
    loaded.image_std = tuple(getattr(processor, "image_std", None) or IMAGENET_STD)
