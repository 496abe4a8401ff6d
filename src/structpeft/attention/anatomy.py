"""Where the query, key, value and output projections of an attention block are, and its heads.

Methods that adapt projections head by head (Kernel-mix, arXiv 2205.03720) need this. Nothing here
knows model families: a block is read from its own structure.

1. Candidates: the linear layers (``nn.Linear``, transformers' ``Conv1D``) at most two levels below
   the block; the number of query heads H from the block, its children or their configs
   (``num_heads``, ``num_attention_heads``, ``n_head``, ``n_heads``).
2. A probe: the block runs once on two random tokens, in eval mode with the model's own eager
   attention, every candidate's output made a leaf of the autograd graph. The output projection is
   the first candidate whose input depends on other candidates' outputs; its input is the heads'
   outputs, head h in columns ``[h·d, (h+1)·d)``. For each head, gradients of its output at the last
   token tell which output rows of which candidates feed it: rows of the last token only are its
   queries; rows of the first token are its keys and values, and among those the values are the rows
   that reach one output dimension each (the output is linear in them), the keys reach all of them.
   Likewise an output gate made beside the queries (Qwen3-Next's ``[q_h | g_h]``) is told apart
   from them and left alone.
   This reads separate projections under any names, fused ones in any row layout (GPT-2's
   ``[q | k | v]``, GPT-NeoX's per-head ``[q_h k_h v_h]``, Phi-3's ``[q | k_gqa | v_gqa]``) and the
   grouping of query heads over key/value heads, RoPE and per-head norms included.
3. Where the probe cannot run (the block's forward needs arguments it cannot make up), separate
   projections are still read from their shapes and names (``q``/``query``, ``k``/``key``,
   ``v``/``value`` as a word of the layer's name); a fused projection then cannot be read.

Blocks on the meta device are probed on a materialised copy with random weights: the layout is a
property of the block's code, not of its weights.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from structpeft.attention.maps import SOFTMAXES, as_head_maps, softmax_dim
from structpeft.core.layers import layer_geometry, module_host
from structpeft.core.targets import get_submodule, is_linear, named_modules, unwrapped, within

_HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_head", "n_heads")
# A config's head count says nothing of a module that shares the config but has no heads (an MLP):
# it counts for modules that also carry a per-head attribute of their own. Not ``num_key_value_groups``:
# transformers' eager attention reads it from any module that calls it, so a module that uses attention
# across something other than heads sets it too (Inkling 2's block attention residual attends over the
# depth, with the positions in the heads' slot).
_PER_HEAD_ATTRIBUTES = ("head_dim", "head_size", "attention_head_size", "key_value_proj_dim")
_NAME_ROLES = {"query": {"q", "query", "wq"}, "key": {"k", "key", "wk"}, "value": {"v", "value", "wv"}}
_PROBE_TOKENS = 2
_MAX_DEPTH = 2  # BERT's block holds ``self.query`` and ``output.dense``


@dataclass(frozen=True)
class AttentionAnatomy:
    """Paths relative to the block and the rows of each role in its layer's output.

    ``query_rows`` lists the query layer's output rows head by head (H·d); ``key_rows`` and
    ``value_rows`` those of key/value head g at ``[g·d, (g+1)·d)``, paired. Query head h uses
    key/value head ``h // (H / Hkv)``. A fused projection is the same path in several roles.
    """

    query: str
    key: str
    value: str
    output: str
    heads: int
    kv_heads: int
    head_dim: int
    query_rows: tuple[int, ...]
    key_rows: tuple[int, ...]
    value_rows: tuple[int, ...]

    @property
    def fused(self) -> bool:
        return self.query == self.key == self.value


class UnreadableBlock(ValueError):
    """The module is not an attention block whose projections structpeft can read."""


# -- candidates and heads -------------------------------------------------------------------
def _candidates(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, layer as found in the block, possibly an adapter wrapper) of its linear layers."""
    return [
        (path, module)
        for path, module in named_modules(block)
        if path and path.count(".") < _MAX_DEPTH and is_linear(unwrapped(module))
    ]


def _int_attribute(obj: object, names: tuple[str, ...]) -> int | None:
    for attribute in names:
        try:
            value = getattr(obj, attribute, None)
        except Exception:  # configs may refuse a global read of a per-layer value
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def declared_heads(module: nn.Module) -> int | None:
    """The one head-count rule: the query heads ``module`` declares as an attribute (``num_heads``,
    ``num_attention_heads``, ``n_head``, ``n_heads``), or else its config's, when the module also
    carries a per-head attribute (``head_dim``...): a config's head count says nothing of a module
    that shares the config but has no heads (an MLP)."""
    heads = _int_attribute(module, _HEAD_ATTRIBUTES)
    if heads is None and _int_attribute(module, _PER_HEAD_ATTRIBUTES):
        heads = _int_attribute(getattr(module, "config", None), _HEAD_ATTRIBUTES)
    return heads


def _query_heads(block: nn.Module) -> int | None:
    """The query heads the block or one of its children declares (:func:`declared_heads`)."""
    return next((heads for m in (block, *block.children()) if (heads := declared_heads(m))), None)


def _geometry(layer: nn.Module) -> tuple[int, int]:
    geometry = layer_geometry(unwrapped(layer))
    return geometry.in_features, geometry.out_features


def _plausible(layers: list[tuple[str, nn.Module]], heads: int) -> bool:
    """Cheap shape test before a probe: some layer could read H heads out, the rest could make them."""
    shapes = [_geometry(m) for _, m in layers]
    for i, (d_in, _) in enumerate(shapes):
        if d_in % heads:
            continue
        head_dim = d_in // heads
        slots = sum(out // head_dim for j, (_, out) in enumerate(shapes) if j != i and out % head_dim == 0)
        if slots >= heads + 2:
            return True
    return False


def _describe(layers: list[tuple[str, nn.Module]]) -> str:
    if not layers:
        return "no linear layers"
    return ", ".join(f"{p} ({'x'.join(map(str, _geometry(m)))})" for p, m in layers)


def _unreadable(name: str, block: nn.Module, layers: list[tuple[str, nn.Module]], reason: str) -> UnreadableBlock:
    return UnreadableBlock(
        f"module {name or '?'!r} ({type(block).__name__}) is not an attention block whose projections structpeft "
        f"can read: {reason}. Projections found: {_describe(layers)}. Target the module that holds the query, key, "
        "value and output projections (e.g. BERT's 'attention', LLaMA's 'self_attn', GPT-2's 'attn'), or leave "
        "target_modules=None to take every block structpeft can read."
    )


# -- the probe ------------------------------------------------------------------------------
class _ProbeFailed(Exception):
    pass


@contextlib.contextmanager
def _probing_mode(block: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout), the models' own eager attention (no fused kernel) and the deltas that
    act inside modules switched off (a head mixer would blend the heads the probe tells apart);
    everything restored after."""
    training = {m: m.training for m in block.modules()}
    hosts = [h for h in map(module_host, block.modules()) if h is not None and not h.disabled]
    configs = {}
    for module in block.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation") and id(config) not in configs:
            configs[id(config)] = (config, config._attn_implementation)
    try:
        block.eval()
        for config, _ in configs.values():
            config._attn_implementation = "eager"
        for host in hosts:
            host.disabled = True
        yield
    finally:
        for host in hosts:
            host.disabled = False
        for module, mode in training.items():
            module.training = mode
        for config, implementation in configs.values():
            config._attn_implementation = implementation


_SAME_AS_HIDDEN = {"key", "value", "keys", "values", "memory", "context", "encoder_hidden_states"}


def _probe_arguments(block: nn.Module, hidden: torch.Tensor) -> tuple[list, dict]:
    """Hidden states as the first argument and as required keys/values (a self-attention run);
    identity rotary embeddings where the forward takes ``position_embeddings`` (cos = 1, sin = 0,
    broadcast over any rotary width); None for every other argument without a default."""
    try:
        parameters = list(inspect.signature(block.forward).parameters.values())
    except (TypeError, ValueError) as error:
        raise _ProbeFailed(f"its forward has no readable signature ({error})") from error
    if not parameters or parameters[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise _ProbeFailed("its forward takes no hidden states")
    tokens = hidden.shape[1]
    rotary = (hidden.new_ones(1, tokens, 1), hidden.new_zeros(1, tokens, 1))
    args, kwargs = [hidden], {}
    for p in parameters[1:]:
        required = p.default is inspect.Parameter.empty
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or not (required or p.name == "position_embeddings"):
            continue
        value = rotary if p.name == "position_embeddings" else hidden if p.name in _SAME_AS_HIDDEN else None
        if p.kind == p.POSITIONAL_ONLY:
            args.append(value)
        else:
            kwargs[p.name] = value
    return args, kwargs


def _materialised(block: nn.Module) -> nn.Module:
    """A copy of a meta-device block with real, random weights (zero buffers: identity rotations;
    boolean ones all True: masks that hide nothing)."""
    replica = copy.deepcopy(block).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in replica.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
        for buffer in replica.buffers():
            # boolean buffers are masks (GPT-2's causal "bias" in older transformers): all True hides nothing
            buffer.fill_(True) if buffer.dtype == torch.bool else buffer.zero_()
    return replica


def _probe_hidden(block: nn.Module, width: int) -> torch.Tensor:
    """Two random tokens of ``width`` in the block's dtype and device, the same every call."""
    parameter = next(iter(block.parameters()), None)
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    device = parameter.device if parameter is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    # Small inputs keep the softmax far from saturation, where gradients would vanish to exact zeros.
    return 0.1 * torch.randn(1, _PROBE_TOKENS, width, generator=generator).to(dtype=dtype, device=device)


def _run_probe(block: nn.Module, layers: list[tuple[str, nn.Module]], width: int):
    """Forward two random tokens of ``width`` through the block; every candidate's output replaced by a
    leaf. Returns (the leaves by path, the inputs by path, call order)."""
    hidden = _probe_hidden(block, width)
    outputs: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    order: list[str] = []

    def hooks(path: str):
        def before(module, args):
            if path in inputs:
                raise _ProbeFailed(f"{path} ran twice in one forward")
            inputs[path] = args[0] if args else None

        def after(module, args, output):
            leaf = output.detach().requires_grad_(True)
            outputs[path] = leaf
            order.append(path)
            return leaf

        return before, after

    handles = []
    try:
        for path, module in layers:
            before, after = hooks(path)
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        args, kwargs = _probe_arguments(block, hidden)
        with _probing_mode(block):
            block(*args, **kwargs)
    except _ProbeFailed:
        raise
    except Exception as error:  # the module's own forward refused the made-up arguments
        raise _ProbeFailed(f"running it on made-up hidden states failed ({type(error).__name__}: {error})") from error
    finally:
        for handle in handles:
            handle.remove()
    return outputs, inputs, order


Rows = dict[str, torch.Tensor]  # per layer, a boolean mask over its output rows


def _one_layer(rows: Rows, what: str) -> tuple[str, tuple[int, ...]]:
    """The one layer ``rows`` lie in, and their indices."""
    layers = [p for p, mask in rows.items() if mask.any()]
    if len(layers) != 1:
        raise _ProbeFailed(f"{what} come from {len(layers)} layers ({', '.join(layers) or 'none'})")
    return layers[0], tuple(rows[layers[0]].nonzero().flatten().tolist())


def _probe_subject(block: nn.Module, layers: list[tuple[str, nn.Module]]):
    """The block a probe runs and its layers: ``block`` itself, or for a meta-device block a materialised
    copy, refused when the block holds more than its projections (too much to materialise)."""
    if not any(p.is_meta for p in block.parameters()):
        return block, layers
    projections = {id(p) for _, m in layers for p in m.parameters()}
    besides = sum(p.numel() for p in block.parameters() if id(p) not in projections)
    if besides > sum(p.numel() for _, m in layers for p in m.parameters()):
        raise _ProbeFailed("it is on the meta device and holds more than its projections (too much to materialise)")
    subject = _materialised(block)
    return subject, [(path, get_submodule(subject, path)) for path, _ in layers]


def _read_by_probe(block: nn.Module, layers: list[tuple[str, nn.Module]], heads: int) -> AttentionAnatomy:
    subject, layers = _probe_subject(block, layers)
    widths = sorted({_geometry(m)[0] for _, m in layers}, key=lambda w: -sum(_geometry(m)[0] == w for _, m in layers))
    failure = None
    for width in widths:  # the block's input width: the most common input width of its layers, first
        try:
            outputs, inputs, order = _run_probe(subject, layers, width)
            break
        except _ProbeFailed as error:
            failure = failure or error
    else:
        raise failure
    output = next((p for p in order if inputs[p] is not None and inputs[p].requires_grad), None)
    if output is None:
        raise _ProbeFailed("no layer reads the other layers' outputs")
    attended = inputs[output]  # (1, N, H·d): the heads' outputs
    if attended.shape[-1] % heads:
        raise _ProbeFailed(f"the output projection {output} reads {attended.shape[-1]} columns, not {heads} heads")
    head_dim = attended.shape[-1] // heads
    if head_dim < 2:
        raise _ProbeFailed("heads of width 1 leave keys and values (and queries and gates) apart")
    sources = {p: outputs[p] for p in order[: order.index(output)]}
    if not sources:
        raise _ProbeFailed(f"{output} reads no other layer's output")
    token_shaped = (1, _PROBE_TOKENS)
    for path, tensor in [*sources.items(), (output, attended)]:
        if tuple(tensor.shape[:2]) != token_shaped or tensor.dim() != 3:
            raise _ProbeFailed(f"{path} sees {tuple(tensor.shape)}, not the {_PROBE_TOKENS} probe tokens")
    query_rows, kv_rows = _head_rows(attended, sources, heads, head_dim)
    return _assemble(query_rows, kv_rows, output, heads, head_dim)


def _head_rows(
    attended: torch.Tensor, sources: dict[str, torch.Tensor], heads: int, head_dim: int
) -> tuple[list[tuple[str, tuple[int, ...]]], list[tuple[tuple[str, tuple[int, ...]], tuple[str, tuple[int, ...]]]]]:
    """Per query head, (layer, rows) of its queries; per query head, the (keys, values) it reads.

    ``attended`` (1, N, H·d) is the output projection's input, ``sources`` the leaves it depends on.
    """

    def support(weights: torch.Tensor, head: int) -> tuple[Rows, Rows]:
        """The rows, at the first and at the last token, that head ``head``'s output at the last token reads."""
        target = (attended[0, -1, head * head_dim : (head + 1) * head_dim] * weights).sum()
        grads = torch.autograd.grad(target, list(sources.values()), retain_graph=True, allow_unused=True)
        grads = {p: torch.zeros_like(sources[p]) if g is None else g for p, g in zip(sources, grads, strict=True)}
        return {p: g[0, 0] != 0 for p, g in grads.items()}, {p: g[0, -1] != 0 for p, g in grads.items()}

    weights = torch.randn(heads, head_dim, generator=torch.Generator().manual_seed(1)).to(attended)
    unit = torch.eye(head_dim, dtype=attended.dtype, device=attended.device)
    query_rows, kv_rows, kv_split = [], [], {}
    for head in range(heads):
        first, last = support(weights[head], head)
        queries = {p: last[p] & ~first[p] for p in sources}
        if sum(int(m.sum()) for m in queries.values()) > head_dim:
            # A gate on the output (Qwen3-Next, AFMoE: out * sigmoid(x W_g)) reaches one output dimension
            # per row; the queries reach all of them.
            along_0, along_1 = support(unit[0], head)[1], support(unit[1], head)[1]
            queries = {p: queries[p] & along_0[p] & along_1[p] for p in sources}
        query_rows.append(_one_layer(queries, f"head {head}'s queries"))
        keys_and_values = tuple((p, tuple(m.nonzero().flatten().tolist())) for p, m in first.items() if m.any())
        if keys_and_values not in kv_split:
            # The keys reach every output dimension of the head, each value row one of them.
            along_0, along_1 = support(unit[0], head)[0], support(unit[1], head)[0]
            keys = {p: along_0[p] & along_1[p] for p in sources}
            kv_split[keys_and_values] = (
                _one_layer(keys, f"head {head}'s keys"),
                _one_layer({p: first[p] & ~keys[p] for p in sources}, f"head {head}'s values"),
            )
        kv_rows.append(kv_split[keys_and_values])
    return query_rows, kv_rows


def _assemble(query_rows: list, kv_rows: list, output: str, heads: int, head_dim: int) -> AttentionAnatomy:
    """One layer per role, whole disjoint heads, query heads over key/value heads in consecutive groups."""
    distinct_kv = list(dict.fromkeys(kv_rows))  # key/value heads in the order query heads first read them
    kv_heads = len(distinct_kv)
    if heads % kv_heads or any(distinct_kv.index(kv) != h // (heads // kv_heads) for h, kv in enumerate(kv_rows)):
        raise _ProbeFailed(f"{heads} query heads do not share {kv_heads} key/value heads in consecutive groups")
    roles = {"query": query_rows, "key": [k for k, _ in distinct_kv], "value": [v for _, v in distinct_kv]}
    paths, rows = {}, {}
    for role, found in roles.items():
        role_layers = {p for p, _ in found}
        if len(role_layers) != 1:
            raise _ProbeFailed(f"the {role} heads come from several layers ({', '.join(sorted(role_layers))})")
        paths[role] = role_layers.pop()
        rows[role] = tuple(r for _, head_rows in found for r in head_rows)
        if any(len(head_rows) != head_dim for _, head_rows in found) or len(set(rows[role])) != len(rows[role]):
            raise _ProbeFailed(f"the {role} rows do not come in disjoint heads of width {head_dim}")
    return AttentionAnatomy(
        paths["query"],
        paths["key"],
        paths["value"],
        output,
        heads,
        kv_heads,
        head_dim,
        rows["query"],
        rows["key"],
        rows["value"],
    )


# -- the fallback: shapes and names ---------------------------------------------------------
def _name_role(path: str) -> str | None:
    words = set(re.split(r"[._]", path.rsplit(".", 1)[-1].lower()))
    roles = [role for role, names in _NAME_ROLES.items() if words & names]
    return roles[0] if len(roles) == 1 else None


def _read_by_shapes(layers: list[tuple[str, nn.Module]], heads: int) -> AttentionAnatomy:
    by_role: dict[str, list[str]] = {role: [] for role in _NAME_ROLES}
    for path, _ in layers:
        role = _name_role(path)
        if role is not None:
            by_role[role].append(path)
    if any(len(paths) != 1 for paths in by_role.values()):
        raise _ProbeFailed(
            "the layer names do not tell one query, one key and one value layer apart "
            f"({', '.join(f'{r}: {p}' for r, p in by_role.items())}), and a fused projection's rows are "
            "read only by running the block"
        )
    shapes = dict((p, _geometry(m)) for p, m in layers)
    query, key, value = (by_role[r][0] for r in ("query", "key", "value"))
    (d_model, width), (_, kv_width) = shapes[query], shapes[key]
    outputs = [p for p in shapes if p not in (query, key, value) and shapes[p] == (width, d_model)]
    if len(outputs) != 1 or width % heads or shapes[value] != shapes[key]:
        raise _ProbeFailed(f"the shapes do not fit {heads} heads with one output projection of {width} -> {d_model}")
    head_dim = width // heads
    if kv_width % head_dim or heads % (kv_width // head_dim):
        raise _ProbeFailed(f"keys of width {kv_width} do not make whole heads of width {head_dim}")
    return AttentionAnatomy(
        query,
        key,
        value,
        outputs[0],
        heads,
        kv_width // head_dim,
        head_dim,
        tuple(range(width)),
        tuple(range(kv_width)),
        tuple(range(kv_width)),
    )


# -- public ---------------------------------------------------------------------------------
def attention_anatomy(block: nn.Module, name: str = "") -> AttentionAnatomy:
    """The projections, their row layouts and the head counts of ``block``, the module holding q, k, v
    and o; an error naming the module and the projections it has when it cannot be read."""
    block = unwrapped(block)
    layers = _candidates(block)
    heads = _query_heads(block)
    if heads is None:
        raise _unreadable(name, block, layers, "neither it nor its children declare a number of heads")
    if not _plausible(layers, heads):
        raise _unreadable(name, block, layers, f"its layers cannot make and read {heads} heads")
    try:
        with torch.inference_mode(False), torch.enable_grad():  # the probe reads gradients
            try:
                return _read_by_probe(block, layers, heads)
            except _ProbeFailed:
                raise
            except Exception as error:  # a block the probe cannot handle: read it another way or refuse
                raise _ProbeFailed(f"probing it failed ({type(error).__name__}: {error})") from error
    except _ProbeFailed as probe_error:
        try:
            return _read_by_shapes(layers, heads)
        except _ProbeFailed as shape_error:
            raise _unreadable(name, block, layers, f"{probe_error}; by names and shapes: {shape_error}") from None


# -- where a block's maps are formed -----------------------------------------------------------
@functools.cache
def calls_attention_interface(cls: type) -> bool:
    """Whether ``cls.forward`` looks the attention function up in transformers' interface: the
    compiled forward names ``ALL_ATTENTION_FUNCTIONS`` among the globals it reads."""
    forward = inspect.unwrap(getattr(cls, "forward", None) or (lambda: None))
    code = getattr(forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def routes_through_interface(module: nn.Module) -> bool:
    """A transformers attention module whose maps are formed by the AttentionInterface's function."""
    return hasattr(getattr(module, "config", None), "_attn_implementation") and calls_attention_interface(type(module))


class _HeadMapCounter(TorchFunctionMode):
    """Counts the softmax outputs shaped as ``heads`` heads' maps and the direct calls of
    scaled_dot_product_attention on ``heads`` heads, except while ``elsewhere`` (another module
    declaring heads of its own runs: the maps are its)."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads, self.count, self.elsewhere = heads, 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.elsewhere:
            return out
        if func in SOFTMAXES and isinstance(out, torch.Tensor):
            self.count += as_head_maps(out, softmax_dim(args, kwargs), self.heads) is not None
        elif func is F.scaled_dot_product_attention:  # its maps inside the kernel, queries (B, H, N, d)
            query = args[0] if args else kwargs["query"]
            self.count += query.dim() == 4 and query.shape[1] == self.heads
        return out


def _own_code_arguments(block: nn.Module, hidden: torch.Tensor) -> tuple[list, dict]:
    """The probe's arguments, plus what attention written by hand computes with that a probe can make
    up without knowing the model: positions 0..N-1, and a required mask that hides nothing."""
    args, kwargs = _probe_arguments(block, hidden)
    parameters = inspect.signature(block.forward).parameters
    tokens = hidden.shape[1]
    if "position_ids" in parameters and kwargs.get("position_ids") is None:
        kwargs["position_ids"] = torch.arange(tokens, device=hidden.device)[None]
    if "attention_mask" in kwargs and kwargs["attention_mask"] is None:  # required: additive, all zeros
        kwargs["attention_mask"] = hidden.new_zeros(1, 1, tokens, tokens)
    return args, kwargs


def forms_own_maps(block: nn.Module) -> bool | None:
    """Whether ``block`` computes its attention maps in its own code (not through transformers'
    AttentionInterface): it declares H heads itself, and run once on made-up hidden states as the probe
    above runs blocks, its forward takes a softmax over the keys shaped as H heads' maps (or calls
    scaled_dot_product_attention on H heads), outside any child that declares heads of its own.
    None: it declares heads but its forward did not run on made-up arguments (it needs position ids,
    an ALiBi bias, a mask of its own making), so the probe cannot tell."""
    block = unwrapped(block)
    heads = _int_attribute(block, _HEAD_ATTRIBUTES)
    layers = _candidates(block)
    if heads is None or not layers or routes_through_interface(block):
        return False
    try:
        block, layers = _probe_subject(block, layers)
    except _ProbeFailed:
        return False  # too much to materialise to find out
    counter = _HeadMapCounter(heads)

    def enter(*_):
        counter.elsewhere += 1

    def leave(*_):
        counter.elsewhere -= 1

    # maps formed in a child that declares heads, or by the interface for a child, are the child's
    others = [
        m
        for path, m in named_modules(block)
        if path and (_int_attribute(m, _HEAD_ATTRIBUTES) or routes_through_interface(m))
    ]
    handles = [h for m in others for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        for width in sorted({_geometry(m)[0] for _, m in layers}):
            try:
                args, kwargs = _own_code_arguments(block, _probe_hidden(block, width))
                with _probing_mode(block), torch.no_grad(), counter:
                    block(*args, **kwargs)
            except Exception:  # noqa: BLE001 - a width it does not take, or arguments it cannot run on
                counter.elsewhere = 0
                continue
            return counter.count > 0
        return None
    finally:
        for handle in handles:
            handle.remove()


def attention_blocks(model: nn.Module, exclude: set[str] = frozenset()) -> list[str]:
    """Paths of the innermost modules that read as attention blocks (their projections found)."""
    found: list[str] = []
    modules = [(n, m) for n, m in named_modules(model) if n and not within(n, exclude)]
    for name, module in reversed(modules):  # children before parents: the innermost block wins
        if any(f.startswith(name + ".") for f in found):
            continue
        block = unwrapped(module)
        heads = _query_heads(block)
        if heads is None or not _plausible(_candidates(block), heads):
            continue
        try:
            attention_anatomy(block, name)
        except UnreadableBlock:
            continue
        found.append(name)
    return found[::-1]
