"""Bad input, as a table: each row is refused with the right error type and words, and leaves the
model (weights bit for bit, requires_grad flags, module tree, adapters) and the files on disk as they
were. Then the config parser and the checkpoint loader are fuzzed."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import structpeft as sp
from structpeft.core.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from structpeft.core.config import configs_from_dict
from tests.models import MLP

X = torch.randn(4, 10)
LORA_A = "base_model.model.lin0.lora_A.weight"


@dataclass
class Env:
    model: sp.PeftModel  # adapters "default" (LoRA on lin0, lin1, keeps head) and "other" (LoRA on lin0)
    base: torch.nn.Module  # a plain MLP
    root: Path  # everything on disk lives here
    checkpoint: Path  # "default", saved

    def broken(self, tensors: Callable[[dict], Any] | None = None, config: Callable[[dict], Any] | None = None) -> Path:
        """A copy of the checkpoint with its tensors and/or config dict edited in place."""
        path = self.root / "broken"
        path.mkdir()
        state = load_file(self.checkpoint / WEIGHTS_NAME)
        cfg = json.loads((self.checkpoint / CONFIG_NAME).read_text())
        if tensors:
            tensors(state)
        if config:
            cfg = config(cfg) or cfg
        save_file(state, path / WEIGHTS_NAME)
        (path / CONFIG_NAME).write_text(json.dumps(cfg))
        return path

    def raw(self, config_text: str | None = None, weights: bytes | None = None) -> Path:
        path = self.root / "raw"
        path.mkdir()
        if config_text is not None:
            (path / CONFIG_NAME).write_text(config_text)
        if weights is not None:
            (path / WEIGHTS_NAME).write_bytes(weights)
        return path


def make_env(root: Path) -> Env:
    torch.manual_seed(0)
    model = sp.get_peft_model(
        MLP(), sp.LoraConfig(r=2, target_modules=["lin0", "lin1"], modules_to_save=["head"], init_weights=False)
    )
    model.add_adapter("other", sp.LoraConfig(r=2, target_modules=["lin0"], modules_to_save=["head"]))
    model.save_pretrained(root / "checkpoint", selected_adapters=["default"])
    return Env(model, MLP(), root, root / "checkpoint")


def fingerprint(module: torch.nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()},
        "grads": [(n, p.requires_grad) for n, p in module.named_parameters()],
        "tree": [(n, type(m).__name__, m.training) for n, m in module.named_modules()],
        "adapters": (
            sorted(module.peft_config),
            list(module.active_adapters),
            sorted(module.frozen_adapters),
            module.adapters_disabled,
            [(n, list(h.merged_adapters)) for n, h in module.adapter_hosts()],
        )
        if isinstance(module, sp.PeftModel)
        else None,
    }


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    states_equal = a["state"].keys() == b["state"].keys() and all(
        torch.equal(a["state"][k], b["state"][k]) for k in a["state"]
    )
    return states_equal and all(a[k] == b[k] for k in ("grads", "tree", "adapters"))


def disk(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def lora(**kw) -> sp.LoraConfig:
    return sp.LoraConfig(**{"target_modules": ["lin0"], **kw})


def nan_at(key: str, value: float = math.nan) -> Callable[[dict], None]:
    def edit(state: dict) -> None:
        state[key] = state[key].clone()
        state[key].view(-1)[0] = value

    return edit


def merged_then(env: Env, call: Callable[[], Any]) -> Callable[[], Any]:
    env.model.merge_adapter()
    return call


def poisoned(env: Env) -> Callable[[], Any]:
    with torch.no_grad():
        env.model.base_model.lin0.adapters["default"]["lora"].lora_B.weight[0, 0] = math.inf
    return env.model.merge_adapter


def with_surm_adapter(env: Env) -> Callable[[], Any]:
    env.model.add_adapter("surm", sp.SurmConfig(mode="adapter", target_modules=["lin1"]))
    return lambda: env.model.merge_adapter(["surm"])


def load(env: Env, path: Path, **kw) -> Callable[[], Any]:
    return lambda: env.model.load_adapter(path, kw.pop("adapter_name", "new"), **kw)


def into_base(env: Env, path: Path) -> Callable[[], Any]:
    return lambda: sp.PeftModel.from_pretrained(env.base, path)


def pickle_only(env: Env) -> Path:
    path = env.raw(config_text=(env.checkpoint / CONFIG_NAME).read_text())
    (path / "adapter_model.bin").write_bytes(b"not unpickled")
    return path


def add(name: Any, config: Any = None) -> Callable[[Env], Callable[[], Any]]:
    return lambda env: lambda: env.model.add_adapter(name, config if config is not None else lora())


def config_edit(**changes) -> Callable[[dict], dict]:
    return lambda cfg: {**cfg, **changes}


def composed(methods: Any) -> Callable[[dict], dict]:
    return lambda cfg: {"peft_type": "STRUCTPEFT_COMPOSED", "methods": methods}


CheckpointError = sp.CheckpointError
# (id, build the action from the environment, error type, words the message must contain)
CASES: list[tuple[str, Callable[[Env], Callable[[], Any]], type[Exception], tuple[str, ...]]] = [
    # -- configs --------------------------------------------------------------------------------------
    ("r-string", lambda e: lambda: lora(r="eight"), TypeError, ("field r", "int", "'eight'")),
    ("r-float", lambda e: lambda: lora(r=8.5), TypeError, ("field r", "int")),
    ("r-bool", lambda e: lambda: lora(r=True), TypeError, ("field r", "bool")),
    ("r-zero", lambda e: lambda: lora(r=0), ValueError, ("rank r", "positive")),
    ("r-negative", lambda e: lambda: lora(r=-2), ValueError, ("rank r", "positive")),
    ("targets-int", lambda e: lambda: lora(target_modules=5), TypeError, ("target_modules", "list[str]")),
    ("targets-empty", lambda e: lambda: lora(target_modules=[]), ValueError, ("target_modules is empty",)),
    ("targets-empty-str", lambda e: lambda: lora(target_modules=""), ValueError, ("empty string",)),
    ("targets-empty-entry", lambda e: lambda: lora(target_modules=["lin0", ""]), ValueError, ("empty name",)),
    ("targets-bad-regex", lambda e: lambda: lora(target_modules="lin[0"), ValueError, ("regular expression",)),
    ("targets-and-saved", lambda e: lambda: lora(modules_to_save=["lin0"]), ValueError, ("both", "modules_to_save")),
    ("saved-str", lambda e: lambda: lora(modules_to_save="head"), TypeError, ("modules_to_save", "list[str]")),
    ("alpha-nan", lambda e: lambda: lora(alpha=math.nan), ValueError, ("alpha", "finite")),
    ("alpha-inf", lambda e: lambda: lora(alpha=math.inf), ValueError, ("alpha", "finite")),
    ("alpha-str", lambda e: lambda: lora(alpha="8"), TypeError, ("alpha", "float")),
    ("dropout-one", lambda e: lambda: lora(dropout=1.0), ValueError, ("dropout", "[0, 1)")),
    ("init-str", lambda e: lambda: lora(init_weights="yes"), TypeError, ("init_weights", "bool")),
    ("flora-rank-zero", lambda e: lambda: sp.FloraConfig(r=[4, 0]), ValueError, ("FLoRA ranks", "positive")),
    ("flora-rank-float", lambda e: lambda: sp.FloraConfig(r=[4, 2.5]), TypeError, ("field r",)),
    ("flora-init", lambda e: lambda: sp.FloraConfig(factor_init="xavier"), ValueError, ("factor_init",)),
    ("flora-alpha-inf", lambda e: lambda: sp.FloraConfig(alpha=-math.inf), ValueError, ("alpha", "finite")),
    ("surm-structure", lambda e: lambda: sp.SurmConfig(structure="hadamard"), ValueError, ("structure", "circulant")),
    ("surm-alpha-nan", lambda e: lambda: sp.SurmConfig(alpha=math.nan), ValueError, ("alpha", "finite")),
    ("surm-rank", lambda e: lambda: sp.SurmConfig(rank=0), ValueError, ("rank", "positive")),
    ("kernel-mix-rank", lambda e: lambda: sp.KernelMixConfig(r_q=-1), ValueError, ("ranks", ">= 0")),
    ("kernel-mix-init", lambda e: lambda: sp.KernelMixConfig(init="random"), ValueError, ("init", "zero")),
    ("coeff-dropout", lambda e: lambda: sp.CoeffConfig(dropout=1.0), ValueError, ("dropout", "[0, 1)")),
    # -- building, adding, switching ------------------------------------------------------------------
    (
        "unknown-target",
        lambda e: lambda: sp.get_peft_model(e.base, lora(target_modules=["lin9"])),
        ValueError,
        ("lin9", "lin0"),
    ),
    ("config-not-config", lambda e: lambda: sp.get_peft_model(e.base, "lora"), TypeError, ("adapter config",)),
    ("config-empty-list", lambda e: lambda: sp.get_peft_model(e.base, []), TypeError, ("non-empty list",)),
    ("already-adapted", lambda e: lambda: sp.get_peft_model(e.model, lora()), ValueError, ("add_adapter",)),
    (
        "already-adapted-base",
        lambda e: lambda: sp.get_peft_model(e.model.base_model, lora()),
        ValueError,
        ("add_adapter",),
    ),
    ("name-empty", lambda e: lambda: sp.get_peft_model(e.base, lora(), adapter_name=""), ValueError, ("is empty",)),
    ("name-dot", add("a.b"), ValueError, ("'a.b'", "'.'")),
    ("name-dotdot", add(".."), ValueError, ("'..'",)),
    ("name-slash", add("../outside"), ValueError, ("'/'",)),
    ("name-absolute", add("/tmp/outside"), ValueError, ("'/'",)),
    ("name-backslash", add("a\\b"), ValueError, ("'\\'",)),
    ("name-base-row", add("__base__"), ValueError, ("reserved",)),
    ("name-moduledict-attribute", add("keys"), ValueError, ("ModuleDict attribute",)),
    ("name-not-str", add(5), TypeError, ("must be a string",)),
    ("name-taken", add("default"), ValueError, ("already exists",)),
    ("add-unknown-target", add("x", lora(target_modules=["lin9"])), ValueError, ("matched no module", "lin9")),
    ("add-saved-module", add("x", lora(target_modules=["head"])), ValueError, ("head",)),
    ("add-targeted-twice", add("x", [lora(), lora(target_modules=["lin0", "lin1"])]), ValueError, ("targeted twice",)),
    ("set-unknown", lambda e: lambda: e.model.set_adapter("nope"), ValueError, ("no adapter named", "nope")),
    ("set-unknown-in-list", lambda e: lambda: e.model.set_adapter(["default", "nope"]), ValueError, ("nope",)),
    (
        "set-two-heads",
        lambda e: lambda: e.model.set_adapter(["default", "other"]),
        ValueError,
        ("'head'", "modules_to_save"),
    ),
    ("delete-unknown", lambda e: lambda: e.model.delete_adapter("nope"), ValueError, ("no adapter named",)),
    (
        "delete-merged",
        lambda e: merged_then(e, lambda: e.model.delete_adapter("default")),
        ValueError,
        ("unmerge_adapter",),
    ),
    ("requires-grad-unknown", lambda e: lambda: e.model.set_requires_grad("nope"), ValueError, ("no adapter named",)),
    # -- merging ----------------------------------------------------------------------------------------
    ("merge-unknown", lambda e: lambda: e.model.merge_adapter(["nope"]), ValueError, ("no adapter named",)),
    ("merge-unload-unknown", lambda e: lambda: e.model.merge_and_unload(adapter_names=["nope"]), ValueError, ("nope",)),
    ("merge-non-finite", poisoned, ValueError, ("'lin0'", "non-finite", "Nothing was merged")),
    ("merge-unmergeable", with_surm_adapter, ValueError, ("lin1 (surm)", "Nothing was merged")),
    # -- mixed batches ------------------------------------------------------------------------------------
    ("rows-too-few", lambda e: lambda: e.model(X, adapter_names=["default"]), ValueError, ("1 entries", "batch of 4")),
    ("rows-unknown", lambda e: lambda: e.model(X, adapter_names=["nope"] * 4), ValueError, ("no adapter named",)),
    ("rows-str", lambda e: lambda: e.model(X, adapter_names="default"), TypeError, ("one per row",)),
    (
        "rows-merged",
        lambda e: merged_then(e, lambda: e.model(X, adapter_names=["default"] * 4)),
        ValueError,
        ("merged",),
    ),
    # -- saving ---------------------------------------------------------------------------------------------
    (
        "save-unknown",
        lambda e: lambda: e.model.save_pretrained(e.root / "out", ["nope"]),
        ValueError,
        ("no adapter named",),
    ),
    (
        "save-into-file",
        lambda e: lambda: e.model.save_pretrained(e.checkpoint / CONFIG_NAME),
        NotADirectoryError,
        ("not a folder",),
    ),
    # -- loading ------------------------------------------------------------------------------------------
    ("load-bad-name", lambda e: load(e, e.checkpoint, adapter_name="a/b"), ValueError, ("'/'",)),
    ("load-name-taken", lambda e: load(e, e.checkpoint, adapter_name="other"), CheckpointError, ("already exists",)),
    ("load-nowhere", lambda e: into_base(e, e.root / "nowhere"), CheckpointError, ("no adapter_config.json",)),
    ("load-no-weights", lambda e: load(e, e.raw(config_text="{}")), CheckpointError, ("no adapter_model.safetensors",)),
    ("load-pickle", lambda e: load(e, pickle_only(e)), CheckpointError, ("pickle",)),
    (
        "config-not-json",
        lambda e: load(e, e.raw('{"peft_type": "LORA", "r": ', b"")),
        CheckpointError,
        ("not a valid adapter config",),
    ),
    ("config-a-list", lambda e: load(e, e.raw("[1, 2]", b"")), CheckpointError, ("'peft_type'",)),
    (
        "config-no-type",
        lambda e: load(e, e.broken(config=lambda c: c.pop("peft_type") and c)),
        CheckpointError,
        ("peft_type",),
    ),
    (
        "config-type-not-str",
        lambda e: load(e, e.broken(config=config_edit(peft_type=3))),
        CheckpointError,
        ("peft_type",),
    ),
    (
        "config-unknown-type",
        lambda e: load(e, e.broken(config=config_edit(peft_type="IA3"))),
        CheckpointError,
        ("'IA3'", "LORA"),
    ),
    (
        "config-misspelt",
        lambda e: load(e, e.broken(config=config_edit(lora_alpah=16))),
        CheckpointError,
        ("'lora_alpah'", "did you mean 'lora_alpha'"),
    ),
    (
        "config-unknown-field",
        lambda e: load(e, e.broken(config=config_edit(rank_r=4))),
        CheckpointError,
        ("unknown LoraConfig field 'rank_r'",),
    ),
    (
        "config-alias-twice",
        lambda e: load(e, e.broken(config=config_edit(alpha=3))),
        CheckpointError,
        ("both 'lora_alpha' and 'alpha'",),
    ),
    (
        "config-r-string",
        lambda e: load(e, e.broken(config=config_edit(r="eight"))),
        CheckpointError,
        ("field r must be int",),
    ),
    (
        "config-targets-int",
        lambda e: load(e, e.broken(config=config_edit(target_modules=5))),
        CheckpointError,
        ("target_modules", "list[str]"),
    ),
    (
        "config-alpha-nan",
        lambda e: load(e, e.broken(config=config_edit(lora_alpha=math.nan))),
        CheckpointError,
        ("alpha", "finite"),
    ),
    (
        "config-dora",
        lambda e: load(e, e.broken(config=config_edit(use_dora=True))),
        CheckpointError,
        ("use_dora=True",),
    ),
    (
        "config-exclude",
        lambda e: load(e, e.broken(config=config_edit(exclude_modules=["lin1"]))),
        CheckpointError,
        ("exclude_modules",),
    ),
    (
        "config-other-model",
        lambda e: load(e, e.broken(config=config_edit(target_modules=["query"]))),
        CheckpointError,
        ("does not fit", "query"),
    ),
    (
        "composed-not-list",
        lambda e: load(e, e.broken(config=composed({"peft_type": "LORA"}))),
        CheckpointError,
        ("'methods'",),
    ),
    ("composed-empty", lambda e: load(e, e.broken(config=composed([]))), CheckpointError, ("non-empty list",)),
    (
        "composed-unknown",
        lambda e: load(e, e.broken(config=composed([{"peft_type": "IA3"}]))),
        CheckpointError,
        ("'IA3'",),
    ),
    (
        "composed-nested",
        lambda e: load(e, e.broken(config=composed([{"peft_type": "STRUCTPEFT_COMPOSED"}]))),
        CheckpointError,
        ("one method's config",),
    ),
    (
        "weights-nan",
        lambda e: load(e, e.broken(tensors=nan_at(LORA_A))),
        CheckpointError,
        ("NaN or infinite", "lin0.lora_A"),
    ),
    (
        "weights-inf",
        lambda e: load(e, e.broken(tensors=nan_at(LORA_A, math.inf))),
        CheckpointError,
        ("NaN or infinite",),
    ),
    (
        "weights-head-inf",
        lambda e: load(e, e.broken(tensors=nan_at("base_model.model.head.bias", -math.inf))),
        CheckpointError,
        ("head.bias",),
    ),
    (
        "weights-int",
        lambda e: load(e, e.broken(tensors=lambda s: s.update({LORA_A: s[LORA_A].int()}))),
        CheckpointError,
        ("non-float", "torch.int32"),
    ),
    (
        "weights-bool",
        lambda e: load(e, e.broken(tensors=lambda s: s.update({LORA_A: s[LORA_A] > 0}))),
        CheckpointError,
        ("non-float", "torch.bool"),
    ),
    (
        "weights-missing",
        lambda e: load(e, e.broken(tensors=lambda s: s.pop(LORA_A))),
        CheckpointError,
        ("missing keys", LORA_A),
    ),
    (
        "weights-unexpected",
        lambda e: load(e, e.broken(tensors=lambda s: s.update({"base_model.model.lin1.lora_C": torch.ones(2)}))),
        CheckpointError,
        ("unexpected keys", "lora_C"),
    ),
    (
        "weights-shape",
        lambda e: load(e, e.broken(tensors=lambda s: s.update({LORA_A: torch.ones(2, 11)}))),
        CheckpointError,
        ("shape mismatches", "(2, 11)"),
    ),
    (
        "weights-base",
        lambda e: load(e, e.broken(tensors=lambda s: s.update({"base_model.model.lin0.weight": torch.ones(20, 10)}))),
        CheckpointError,
        ("overwrite the base model's weights",),
    ),
    (
        "weights-base-layer",
        lambda e: load(
            e, e.broken(tensors=lambda s: s.update({"base_model.model.lin1.base_layer.weight": torch.ones(20, 20)}))
        ),
        CheckpointError,
        ("overwrite the base model's weights", "lin1.base_layer"),
    ),
    (
        "weights-truncated",
        lambda e: load(
            e, e.raw((e.checkpoint / CONFIG_NAME).read_text(), (e.checkpoint / WEIGHTS_NAME).read_bytes()[:-7])
        ),
        CheckpointError,
        ("truncated or corrupt",),
    ),
    (
        "weights-empty",
        lambda e: load(e, e.raw((e.checkpoint / CONFIG_NAME).read_text(), b"")),
        CheckpointError,
        ("truncated or corrupt",),
    ),
    (
        "weights-huge-header",
        lambda e: load(e, e.raw((e.checkpoint / CONFIG_NAME).read_text(), (2**62).to_bytes(8, "little") + b"{}")),
        CheckpointError,
        ("cannot be read",),
    ),
    (
        "weights-into-base-nan",
        lambda e: into_base(e, e.broken(tensors=nan_at(LORA_A))),
        CheckpointError,
        ("NaN or infinite",),
    ),
]


def test_the_table_is_large_and_its_unbroken_checkpoint_loads(tmp_path) -> None:
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)
    env = make_env(tmp_path)
    env.model.load_adapter(env.broken(), "new")  # the edits, not the copying, are what breaks a case
    assert "new" in env.model.peft_config


@pytest.mark.parametrize("name,build,error,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(tmp_path, name, build, error, words) -> None:
    env = make_env(tmp_path)
    action = build(env)
    before = fingerprint(env.model), fingerprint(env.base), disk(tmp_path)
    with pytest.raises(error) as info:
        action()
    message = str(info.value)
    assert all(w in message for w in words), message
    after = fingerprint(env.model), fingerprint(env.base), disk(tmp_path)
    assert same(before[0], after[0]), "the adapted model changed"
    assert same(before[1], after[1]), "the base model changed"
    assert before[2] == after[2], "files on disk changed"


# -- fuzzing, bounded: a few dozen examples each ----------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 40) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
lora_fields = st.sampled_from(
    [
        "r",
        "lora_alpha",
        "alpha",
        "target_modules",
        "modules_to_save",
        "lora_dropout",
        "init_lora_weights",
        "bias",
        "use_dora",
        "task_type",
        "lora_alpah",
        "peft_type",
        "methods",
        "fan_in_fan_out",
    ]
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    peft_type=st.sampled_from(["LORA", "FLORA", "SURM", "KERNEL_MIX", "COEFF", "STRUCTPEFT_COMPOSED", "X"]),
    fields=st.dictionaries(lora_fields | st.text(max_size=8), json_values, max_size=6),
)
def test_config_parser_answers_any_json_with_a_config_or_a_clear_error(peft_type, fields) -> None:
    try:
        configs = configs_from_dict({**fields, "peft_type": peft_type})
    except (ValueError, TypeError) as e:
        assert str(e)
        return
    assert configs and all(isinstance(c, sp.AdapterConfig) for c in configs)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_checkpoint_loader_refuses_mutated_files_without_changing_the_model(tmp_path_factory, data) -> None:
    env = make_env(tmp_path_factory.mktemp("fuzz"))
    weights = bytearray((env.checkpoint / WEIGHTS_NAME).read_bytes())
    config = (env.checkpoint / CONFIG_NAME).read_text()
    target = data.draw(st.sampled_from(["weights", "config", "both"]))
    if target in ("weights", "both"):
        for _ in range(data.draw(st.integers(1, 4))):
            weights[data.draw(st.integers(0, len(weights) - 1))] = data.draw(st.integers(0, 255))
        weights = weights[: data.draw(st.integers(0, len(weights)))] if data.draw(st.booleans()) else weights
    if target in ("config", "both"):
        cut = data.draw(st.integers(0, len(config)))
        config = config[:cut] + data.draw(st.text(max_size=6)) + config[cut + data.draw(st.integers(0, 3)) :]
    path = env.raw(config, bytes(weights))
    before = fingerprint(env.model)
    try:
        env.model.load_adapter(path, "fuzzed")
    except sp.CheckpointError as e:
        assert "fuzzed" not in env.model.peft_config and str(e)
        assert same(before, fingerprint(env.model))
    else:  # a mutation that kept the file valid (e.g. in a float's low bits) loads as a whole adapter
        assert "fuzzed" in env.model.peft_config
