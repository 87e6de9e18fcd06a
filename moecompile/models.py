"""Built-in demo models: small transformers MoE models with random weights (no download).

`build(name)` returns `(model, (input_ids,))` ready for `torch.compile(model, backend="moe")`.
The configs keep every MoE feature of the real model (routing, activation, shared experts) at a
size a CPU compiles in seconds.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from .errors import UserInputError

VOCAB = 128


def _common(hidden: int, layers: int) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


def _mixtral(hidden, layers):
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM, MixtralConfig(**_common(hidden, layers), intermediate_size=2 * hidden,
                                             num_local_experts=8, num_experts_per_tok=2)


def _qwen3_moe(hidden, layers):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM, Qwen3MoeConfig(**_common(hidden, layers), head_dim=hidden // 4,
                                               intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
                                               num_experts=16, num_experts_per_tok=4, norm_topk_prob=True)


def _olmoe(hidden, layers):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    return OlmoeForCausalLM, OlmoeConfig(**_common(hidden, layers), intermediate_size=hidden,
                                         num_experts=16, num_experts_per_tok=4, norm_topk_prob=False)


def _qwen2_moe(hidden, layers):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM, Qwen2MoeConfig(**_common(hidden, layers), intermediate_size=2 * hidden,
                                               moe_intermediate_size=hidden // 2,
                                               shared_expert_intermediate_size=hidden, num_experts=8,
                                               num_experts_per_tok=2, norm_topk_prob=False)


def _mistral_dense(hidden, layers):
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM, MistralConfig(**_common(hidden, layers), intermediate_size=2 * hidden)


BUILDERS: dict[str, Callable] = {
    "mixtral": _mixtral, "qwen3_moe": _qwen3_moe, "olmoe": _olmoe, "qwen2_moe": _qwen2_moe,
    "dense": _mistral_dense,
}
MOE_MODELS = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe")


def names() -> list[str]:
    return list(BUILDERS)


def build(name: str, dtype: str | torch.dtype = "float32", experts_impl: str = "grouped_mm",
          batch: int = 2, tokens: int = 16, layers: int = 2, hidden: int = 64, seed: int = 0):
    """A small random-weight model and an input for it: `(model, (input_ids (batch, tokens),))`.

    `name` is a built-in (see `names()`) or `package.module:factory`, a function returning a model
    (inputs are then random token ids up to the model's `config.vocab_size`).
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    torch.manual_seed(seed)
    if ":" in name:
        model = _import_factory(name)()
        vocab = getattr(getattr(model, "config", None), "vocab_size", VOCAB)
    elif name in BUILDERS:
        model_cls, config = BUILDERS[name](hidden, layers)
        if name in MOE_MODELS:
            config._experts_implementation = experts_impl
        config.use_cache = False
        model = model_cls(config)
        vocab = VOCAB
    else:
        raise UserInputError(f"unknown model {name!r}; built-in: {', '.join(names())}, "
                             "or package.module:factory")
    model = model.to(dtype).eval()
    ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed + 1))
    return model, (ids,)


def _import_factory(path: str) -> Callable:
    module_name, _, attr = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UserInputError(f"cannot load model factory {path!r}: {err}") from None
    if not callable(factory):
        raise UserInputError(f"model factory {path!r} is not callable")
    return factory
