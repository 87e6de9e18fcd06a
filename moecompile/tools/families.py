"""Every Mixture-of-Experts family of the installed transformers, built tiny with random weights.

A driver for sweeps and tests (the core package never imports it):

    moe_families()              -> ["afmoe", "aria", "dbrx", ...]   enumerated from transformers itself
    build_family("mixtral")     -> (model, {"input_ids": (B, T) int64})
    expert_modules(model)       -> ["model.layers.0.mlp.experts", ...]

Enumeration: one model type per transformers model folder whose modeling code names an expert count
(`num_experts`, `num_local_experts`, `n_routed_experts`, `moe_num_experts`), confirmed by building it
tiny and finding a module that holds expert weights. A family transformers adds later shows up with no
change here; one that cannot be built stays listed and `build_family` raises `FamilyUnavailable`.

Shrinking is generic: the config class's defaults, with fields overridden by name (`_RULES`: hidden 64,
2 layers, 4 heads, vocab 128, 8 experts top-2, intermediate 32, every MLP sparse), and per-family data
(`_OVERRIDES`) only where no name rule can know. Multimodal families build their text part (the
sub-config that names an expert count, with its causal-LM or text model class); encoder-decoder
families also get `decoder_input_ids`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pathlib
import re
from typing import Any, Callable

import torch

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 64, 2, 4, 2, 16, 128
EXPERTS, TOP_K, INTERMEDIATE = 8, 2, 32

_EXPERT_COUNT = re.compile(r"^(num_experts|num_local_experts|n_routed_experts|moe_num_experts|num_routed_experts)$")
_SOURCE_MARK = re.compile(r"num_experts|num_local_experts|n_routed_experts|moe_num_experts")
_KEEP = object()  # a rule's answer: leave the field at its default


class FamilyUnavailable(Exception):
    """A MoE family of transformers that cannot be built tiny here; `reason` is one line."""

    def __init__(self, model_type: str, reason: str):
        super().__init__(f"{model_type}: {reason}")
        self.model_type, self.reason = model_type, reason


# --- shrinking rules: (field-name pattern, rule(default, all defaults) -> value | _KEEP) ------------


def _pos(fn: Callable[[int], Any]) -> Callable[[Any, dict], Any]:
    """Apply `fn` to a positive int (or each of a list of them); 0, None and the rest stay."""
    def rule(value, defaults):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return fn(value)
        if isinstance(value, list) and value and all(type(v) is int and v > 0 for v in value):
            return [fn(v) for v in value]
        return _KEEP
    return rule


def _const(value):
    return lambda _old, _defaults: value


def _kv_heads(value, defaults):
    """Grouped-query attention keeps KV_HEADS; multi-head (and MLA) stays multi-head; MQA stays 1."""
    if type(value) is not int or value <= 0:
        return _KEEP
    heads = next((v for k, v in defaults.items() if re.search(r"(num_attention_heads|^n_heads)$", k)), None)
    return 1 if value == 1 else HEADS if value == heads else KV_HEADS


def _head_dim(value, defaults):
    """HEAD_DIM; twice that where the config's head_dim spans both MLA parts (nope + rope)."""
    if value is None:
        return HEAD_DIM
    if type(value) is not int or value <= 0:
        return _KEEP
    nope = defaults.get("qk_nope_head_dim") or 0
    return 2 * HEAD_DIM if nope and value == nope + (defaults.get("qk_rope_head_dim") or 0) else HEAD_DIM


def _token_id(value, defaults):
    if type(value) is int and value >= VOCAB:
        return VOCAB - 1
    if isinstance(value, list) and all(type(v) is int for v in value):
        return [min(v, VOCAB - 1) for v in value]
    return _KEEP


def _layer_kinds(value, defaults):
    """A per-layer kind list cut to 2 layers: every MLP sparse where the list names sparse kinds
    (dense/sparse, mlp/moe), and two different mixers where there are (linear + full attention)."""
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, str) for v in value):
        return _KEEP
    kinds = list(dict.fromkeys(value))
    sparse = [k for k in kinds if re.search(r"sparse|moe|expert", k)]
    kinds = [k for k in kinds if not (sparse and re.fullmatch(r"dense|mlp", k))]
    if sparse and len(kinds) > 2:
        kinds = [next(k for k in kinds if k not in sparse), sparse[0]]
    return (kinds + [kinds[-1]])[:2]


def _rope(value, defaults):
    """Multimodal rotary sections (t, h, w) rescaled to sum to half the new rotary dim; where the
    config has none, the modeling code's fallback (`rope_parameters.get("mrope_section", [...])`)."""
    section = (value.get("mrope_section") if isinstance(value, dict) else None) or defaults.get("_mrope")
    if not isinstance(value, dict) or not isinstance(section, list):
        return _KEEP
    partial = value.get("partial_rotary_factor", defaults.get("partial_rotary_factor") or 1.0)
    target = int(HEAD_DIM * partial) // 2
    new = [s * target // sum(section) for s in section]
    for i in range(target - sum(new)):
        new[i % len(new)] += 1
    return {**value, "mrope_section": new}


_RULES: list[tuple[str, Callable]] = [  # the first pattern that matches a field name decides
    # experts: E=8, K=2; an expert count or top-k that a config leaves None means "no MoE": set it
    (_EXPERT_COUNT.pattern, _const(EXPERTS)),
    (r"^(num_experts_per_tok|num_experts_per_token|moe_topk|moe_top_k|moe_k|top_k|top_k_experts|router_top_k)$",
     _const(TOP_K)),
    (r"^zero_expert_num$", _pos(lambda v: 2)),
    # group-limited routing kept where it is on: 8 experts in 4 groups of 2, top 2 groups
    (r"^(n_group|num_expert_group)$", lambda v, d: 4 if type(v) is int and v > 1 else _KEEP),
    (r"^topk_group$", lambda v, d: 2 if type(v) is int and v > 1 else _KEEP),
    (r"^(n_shared_experts|num_shared_experts)$", lambda v, d: 1 if v is None else _KEEP),
    (r"^moe_intermediate_size$", lambda v, d: [INTERMEDIATE] * len(v) if isinstance(v, list) else INTERMEDIATE),
    # every layer sparse: no dense prefix, no dense interleave
    (r"^(first_k_dense_replace|num_dense_layers|moe_layer_start_index|expert_layer_offset)$", _pos(lambda v: 0)),
    (r"^moe_layer_end_index$", _pos(lambda v: LAYERS - 1)),
    (r"^(moe_layer_interval|decoder_sparse_step|encoder_sparse_step|moe_layer_freq|interleave_moe_layer_step|"
     r"expert_layer_period)$", _pos(lambda v: 1)),
    (r"^(num_sparse_encoder_layers|num_sparse_decoder_layers)$", _pos(lambda v: LAYERS)),
    (r"^mlp_only_layers$", _const([])),
    (r"^(is_moe|enable_moe_block|use_moe)$", _const(True)),
    # sizes
    (r"^(hidden_size|d_model|n_embd)$", _pos(lambda v: HIDDEN)),
    (r"^hidden_size_per_layer_input$", _pos(lambda v: 16)),
    (r"(intermediate_size|ffn_hidden_size|ffn_dim|^d_ff|_hidden_size|share_expert_dim|intermediate_size_mlp)$",
     _pos(lambda v: INTERMEDIATE)),
    (r"^(num_hidden_layers|num_layers|n_layers|num_decoder_layers|encoder_layers|decoder_layers)$",
     _pos(lambda v: LAYERS)),
    (r"(key_value_heads|kv_heads|num_key_heads|kv_n_heads)$", _kv_heads),
    (r"^(mamba_n_heads|mamba_num_heads)$", _pos(lambda v: 8)),  # 8 x 16 = expand 2 x hidden 64
    (r"^index_num_heads$", _pos(lambda v: 1)),  # indexer heads: at most the query heads of one key head
    (r"(num_attention_heads|^n_heads|^num_heads|_num_heads|_n_heads|attention_heads|num_value_heads)$",
     _pos(lambda v: HEADS)),
    (r"^qk_head_dim$", _pos(lambda v: 2 * HEAD_DIM)),  # qk_nope_head_dim + qk_rope_head_dim
    (r"^head_dim$", _head_dim),
    (r"(head_dim|^d_kv|mamba_d_head|kv_channels)$", _pos(lambda v: HEAD_DIM)),
    (r"^(kv_lora_rank|o_lora_rank)$", _pos(lambda v: 16)),
    (r"^q_lora_rank$", _pos(lambda v: 32)),
    (r"(_rank|_lowrank)$", _pos(lambda v: 8)),
    (r"^(o_groups|mamba_n_groups|n_groups)$", _pos(lambda v: min(v, 2))),
    (r"(d_state|ssm_state_size)$", _pos(lambda v: 16)),
    (r"^index_topk$", _pos(lambda v: 4)),  # sparse attention keeps fewer keys than T = 8
    (r"^index_kpool$", _pos(lambda v: min(v, 2))),
    (r"vocab_size", _pos(lambda v: VOCAB)),
    (r"(token_id|token_ids|token_index)$", _token_id),
    (r"^(max_position_embeddings|model_max_length|max_seq_len|n_positions)$", _pos(lambda v: 256)),
    (r"^(sliding_window|sliding_window_size)$", _pos(lambda v: 4)),  # shorter than T = 8: the mask matters
    (r"(_every_n_layers|_pattern|_interval|layer_group_size)$", _pos(lambda v: min(v, 2))),
    (r"(layer_types|block_type|block_types)$", _layer_kinds),
    (r"^rope_parameters$", _rope),
]

# Per-family fields that no name rule can know (model type -> field -> value; a dict value is a part).
_OVERRIDES: dict[str, dict[str, Any]] = {
    # read by the attention but absent from the attention config class; clamp(None, None) fails
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    "deepseek_ocr2": {"mlp_layer_types": ["sparse", "sparse"]},  # left None by the text config alone
    "doge": {"num_experts": 16},  # product-key experts: E must be a square (4 x 4 keys)
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},  # None has no fallback
    "qwen4_exp": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 4,
                  "indexer_compress_ratio": 2},  # its default layers use sparse attention, unset by default
    "step3p7": {"sliding_window": 4},  # its masks always include a sliding one
    "zaya": {"num_experts_per_tok": 1},  # the config accepts top-1 only
}


def _shrunk_fields(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The fields of `values` that `_RULES` change, with their new values."""
    changed: dict[str, Any] = {}
    for key, value in values.items():
        rule = next((r for pattern, r in _RULES if re.search(pattern, key)), None)
        new = rule(value, defaults) if rule and not key.startswith("_") else _KEEP
        if new is not _KEEP and new != value:
            changed[key] = new
    return changed


def _shrunk_kwargs(config_cls, overrides: dict[str, Any]) -> dict[str, Any]:
    """Constructor kwargs of a tiny `config_cls`: its defaults shrunk by `_RULES`, then `overrides`."""
    defaults = {**config_cls().to_dict(), "_mrope": _mrope_fallback(config_cls)}
    kwargs = _shrunk_fields(defaults, defaults)
    for key, sub_cls in getattr(config_cls, "sub_configs", {}).items():  # parts of one model (dbrx)
        if isinstance(defaults.get(key), dict):
            kwargs[key] = _shrunk_kwargs(sub_cls, overrides.get(key, {}))
    return {**kwargs, **{k: v for k, v in overrides.items() if not isinstance(v, dict)}}


def _modeling_module(config_cls):
    return importlib.import_module(config_cls.__module__.replace(".configuration_", ".modeling_"))


def _mrope_fallback(config_cls) -> list[int] | None:
    found = re.search(r'get\("mrope_section",\s*\[([\d,\s]+)\]\)', inspect.getsource(_modeling_module(config_cls)))
    return [int(x) for x in found.group(1).split(",")] if found else None


# --- which config and model class to build ------------------------------------------------------


def _fields(config_cls) -> dict[str, Any]:
    try:
        return config_cls().to_dict()
    except Exception:  # noqa: BLE001 -- a part that cannot be built by itself has no say
        return {}


def _names_experts(config_cls) -> bool:
    return any(_EXPERT_COUNT.match(str(k)) for k in _fields(config_cls))


def _text_config_cls(config_cls, top: bool = True):
    """The config class to build: the family's own when it is a language model (its fields or a
    part's name an expert count, dbrx), else the sub-config, text parts first, that names one."""
    subs = getattr(config_cls, "sub_configs", {})
    if "vocab_size" in _fields(config_cls) and (
            _names_experts(config_cls) or not subs or any(_names_experts(c) for c in subs.values())):
        return config_cls
    for _, sub_cls in sorted(subs.items(), key=lambda kv: "text" not in kv[0]):
        found = _text_config_cls(sub_cls, top=False)
        if found is not None and _names_experts(found):
            return found
    return config_cls if top else None


def _model_cls(config_cls):
    """A causal LM for the config (auto mapping, then a class of its modeling module), else its
    seq2seq LM, else its base model (auto mapping, then a `*TextModel` / `*Model` of the module)."""
    import transformers
    from transformers.models.auto import modeling_auto as auto

    module = _modeling_module(config_cls)
    own = [c for _, c in inspect.getmembers(module, inspect.isclass)
           if getattr(c, "config_class", None) is config_cls and c.__module__ == module.__name__]

    def mapped(mapping):
        name = mapping.get(getattr(config_cls, "model_type", ""))
        cls = (getattr(module, name, None) or getattr(transformers, name, None)) if isinstance(name, str) else None
        return cls if cls is not None and getattr(cls, "config_class", None) in (config_cls, None) else None

    def suffixed(*suffixes):
        return next((c for s in suffixes for c in own if c.__name__.endswith(s)), None)

    return (mapped(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) or suffixed("ForCausalLM")
            or mapped(auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES) or mapped(auto.MODEL_MAPPING_NAMES)
            or suffixed("TextModel", "Model"))


def _perturb_constants(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Parameters (and bias buffers) that init left constant -- zero router and correction biases,
    unit norms -- get noise: a zero router makes top-k a tie, a zero bias hides whether it is added."""
    tensors = [t for _, t in model.named_parameters()]
    tensors += [b for n, b in model.named_buffers() if "bias" in n.rsplit(".", 1)[-1]]
    with torch.no_grad():
        for t in tensors:
            if t.is_floating_point() and t.numel() > 1 and bool((t == t.flatten()[0]).all()):
                t.add_(torch.randn(t.shape, generator=gen).to(t.dtype) * 0.02)


def build_family(model_type: str, dtype: torch.dtype = torch.float32, experts_impl: str | None = None,
                 seed: int = 0, tokens: tuple[int, int] = (2, 8)):
    """A tiny random-weight model of `model_type` in eval mode and its inputs:
    `(model, {"input_ids": (B, T) int64[, "decoder_input_ids": (B, T)]})` with `tokens = (B, T)`.
    `experts_impl` ("eager", "grouped_mm", "batched_mm") sets `config._experts_implementation`; None
    keeps transformers' default. Raises FamilyUnavailable with a one-line reason."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise FamilyUnavailable(model_type, "not a model type of the installed transformers")
    config_cls = _text_config_cls(CONFIG_MAPPING[model_type])
    model_cls = _model_cls(config_cls)
    if model_cls is None:
        raise FamilyUnavailable(model_type, f"no model class takes {config_cls.__name__}")
    if "input_ids" not in inspect.signature(model_cls.forward).parameters:
        raise FamilyUnavailable(model_type, f"{model_cls.__name__} takes no token ids (vision inputs only)")
    try:
        kwargs = _shrunk_kwargs(config_cls, _OVERRIDES.get(model_type, {}))
        config = config_cls(**kwargs)
        per_layer = config.to_dict().get("per_layer_config")
        if per_layer:  # heterogeneous layers: the per-layer sizes the config derived, shrunk too
            defaults = config_cls().to_dict()
            config = config_cls(**kwargs, per_layer_config={
                i: {**d, **_shrunk_fields(d, {**defaults, **d})} for i, d in per_layer.items()})
        config.use_cache = False
        if experts_impl is not None:
            config._experts_implementation = experts_impl
        torch.manual_seed(seed)
        model = model_cls(config)
    except ImportError as err:
        raise FamilyUnavailable(model_type, f"missing dependency: {str(err).splitlines()[0]}") from None
    gen = torch.Generator().manual_seed(seed)
    _perturb_constants(model, gen)
    model = model.to(dtype).eval()
    batch, seq = tokens
    inputs = {"input_ids": torch.randint(0, config.vocab_size, (batch, seq), generator=gen)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    return model, inputs


# --- what holds the experts -----------------------------------------------------------------------


def _expert_counts(config) -> set[int]:
    """Every expert count > 1 named in a config or its parts."""
    def walk(d: dict):
        for key, value in d.items():
            if isinstance(value, dict):
                yield from walk(value)
            elif _EXPERT_COUNT.match(str(key)) and type(value) is int and value > 1:
                yield value
    return set(walk(config.to_dict()))


def _holds_experts(name: str, module: torch.nn.Module, counts: set[int]) -> bool:
    own = [p for _, p in module.named_parameters(recurse=False)]
    if any(p.dim() == 3 and p.shape[0] in counts for p in own):  # (E, ., .) stacked experts
        return True
    if isinstance(module, torch.nn.Embedding) and module.num_embeddings in counts:  # product-key experts
        return True
    if isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)) and len(module) > 1:
        return name.rsplit(".", 1)[-1].endswith("experts")
    # (E*I, H) matrices under an `experts` module: experts stacked along rows (dbrx)
    return ".experts." in f".{name}." and "shared" not in name and any(
        p.dim() == 2 and any(p.shape[0] % e == 0 and p.shape[0] > e for e in counts) for p in own)


def expert_modules(model: torch.nn.Module) -> list[str]:
    """Qualified names of the modules that hold expert weights (the MoE layers a report must list):
    a 3D parameter (E, ., .), an embedding of E rows, a ModuleList / ModuleDict named like `experts`,
    or (E*I, H) matrices under an `experts` module. Siblings that split one layer's experts (input
    and output projections) are named by their parent."""
    counts = _expert_counts(model.config) if hasattr(model, "config") else set()
    names = [n for n, m in model.named_modules() if n and _holds_experts(n, m, counts)]
    names = [n for n in names if not any(n.startswith(f"{o}.") for o in names)]  # the outermost only
    parents = [n.rpartition(".")[0] for n in names]
    return list(dict.fromkeys(p if parents.count(p) > 1 else n for n, p in zip(names, parents)))


def experts_kind(model: torch.nn.Module) -> str:
    """How the experts are written: "eager/grouped_mm/batched_mm" (transformers'
    `@use_experts_implementation`, switchable), "ModuleList[<expert class>]", or the module class."""
    kinds = []
    for name in expert_modules(model):
        module = model.get_submodule(name)
        if hasattr(module, "_is_expert_parallel") and hasattr(module, "has_gate"):
            kinds.append("eager/grouped_mm/batched_mm")
        elif isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            kinds.append(f"{type(module).__name__}[{type(next(iter(module.children()))).__name__}]")
        else:
            kinds.append(type(module).__name__)
    return ", ".join(dict.fromkeys(kinds))


# --- enumeration ----------------------------------------------------------------------------------


def _all_sub_configs(config_cls) -> list:
    subs = list(getattr(config_cls, "sub_configs", {}).values())
    return subs + [s for sub in subs for s in _all_sub_configs(sub)]


def candidate_families() -> list[str]:
    """One model type per transformers model folder whose modeling code names an expert count: the
    folder's top-level config (not a part of another config there)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, model_type_to_module_name

    root = pathlib.Path(transformers.__file__).parent / "models"
    by_folder: dict[str, list[str]] = {}
    for model_type in CONFIG_MAPPING.keys():
        by_folder.setdefault(model_type_to_module_name(model_type), []).append(model_type)
    chosen = []
    for folder, types in sorted(by_folder.items()):
        if not any(_SOURCE_MARK.search(f.read_text()) for f in (root / folder).glob("modeling_*.py")):
            continue
        parts = {id(sub) for t in types for sub in _all_sub_configs(CONFIG_MAPPING[t])}
        chosen.append(next((t for t in types if id(CONFIG_MAPPING[t]) not in parts), types[0]))
    return chosen


@functools.lru_cache(maxsize=1)
def moe_families() -> list[str]:
    """The candidates that build tiny with at least one module holding expert weights, plus those that
    cannot be built (build_family raises FamilyUnavailable, or fails: a bug to see, not to hide)."""
    kept = []
    for model_type in candidate_families():
        try:
            model, _ = build_family(model_type)
        except Exception:  # noqa: BLE001 -- listed: the test of this family shows what went wrong
            kept.append(model_type)
            continue
        if expert_modules(model):
            kept.append(model_type)
    return kept


# Families whose MoE layers stay as traced (correct: the rewrite declines), each with what it would
# take: "limit" where the layer is not one the op computes, "work" where it could be with more code.
# tests/test_families.py holds every other family to every MoE layer optimized (after
# moecompile.prepare where PREPARED says so), and each family here to at least one layer left, so
# the list only shrinks; scripts/family_table.py prints it beside the support table.
LEFT_AS_TRACED: dict[str, tuple[str, str]] = {
    "doge": ("limit", "DogeCDMoE retrieves per-token expert vectors by product keys (an embedding lookup "
                      "per expert, no expert MLP), which the grouped GEMMs do not compute"),
    "ergo": ("work", "each expert's output goes through its own RMS norm (post_expert_norm, (E, H) "
                     "weights) before the weighted sum; the spec has no expert norm"),
    "muse_spark": ("work", "an RMS norm of each expert's intermediate activation (post_expert_norm) "
                           "between the two GEMMs; the spec has no expert norm"),
    "llama4": ("work", "every expert runs on every token, its input scaled by the router score "
                       "(expert(s * x), s = 0 off the top-k); the op scales expert outputs"),
    "jetmoe": ("work", "attention heads as experts (MoA) and an MLP layer split over graphs by a loop over "
                       "the experts that prepare has no form for"),
    "nllb-moe": ("work", "capacity-limited top-2 over a ModuleDict of biased experts, with token dropout "
                         "scaling, each expert traced on its own; prepare has no form for it"),
}
# Families optimized only after moecompile.prepare (their layer is split over graphs otherwise).
PREPARED = {"dbrx", "openai_privacy_filter", "switch_transformers"}
