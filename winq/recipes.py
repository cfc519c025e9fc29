"""Per-tensor type recipes: which grid each Linear trains in, as llama.cpp's quantization mixes choose GGUF types.

    layer_plan(cfg, {"model.layers.0.mlp.down_proj": 1536, ...})  ->  {name: LayerQuant(grid, bits, group_size)}

Without a recipe every layer gets QuantConfig's grid, bits and group size, except that a K grid (q2_k .. q6_k)
on rows that are not whole 256-weight super-blocks takes llama.cpp's fallback for that type (KFormat.fallback:
Q2_K / Q3_K -> Q4_0 (lsq 4-bit), Q4_K -> Q5_0 (lsq 5-bit), Q6_K -> Q8_0 (lsq 8-bit); Q5_K -> Q5_0 where
llama.cpp uses Q5_1), as llama_model_quantize of llama-cpp-python 0.3.36 does (older llama.cpp used IQ4_NL for
Q2_K / Q3_K; train such layers in IQ4_NL with --grid nl4 instead). The recipes:

| recipe          | layers                                                                                   |
|-----------------|------------------------------------------------------------------------------------------|
| q2_k .. q6_k    | every layer in that K grid (with the fallback above)                                     |
| q4_k_m / q5_k_m | Q4_K / Q5_K, but attn_v and ffn_down in Q6_K on the layers llama.cpp's use_more_bits picks |
|                 | (the first and last eighth, and every third layer in between)                              |

llama.cpp's Q4_K_M stores the output / tied token table in Q6_K (rows of 576 fall back to Q8_0); winq keeps
the table as QuantConfig.embed says (q8_0 by default). llama.cpp's rules for other tensor kinds (MoE experts,
attn_qkv, ...) and other mixes are not reproduced.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError
from .grids import KGRID_SUB
from .kquant import KFORMATS, SUPER

RECIPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_k_m", "q5_k_m")
_BASE = {"q4_k_m": "q4_k", "q5_k_m": "q5_k"}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class LayerQuant:
    grid: str
    bits: int
    group_size: int


def check_recipe(recipe: str | None) -> None:
    if recipe is not None and recipe not in RECIPES:
        raise ConfigError(f"recipe={recipe!r}: choose one of {', '.join(RECIPES)}")


def base_grid(recipe: str) -> LayerQuant:
    """The recipe's main grid (what QuantConfig's grid / bits / group_size become)."""
    check_recipe(recipe)
    g = _BASE.get(recipe, recipe)
    return LayerQuant(g, KFORMATS[g].bits, KGRID_SUB[g])


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits(i_layer, n_layers) (integer division as in C)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _fallback(lq: LayerQuant, in_features: int) -> LayerQuant:
    fmt = KFORMATS.get(lq.grid)
    if fmt is None or in_features % SUPER == 0:
        return lq
    return LayerQuant(*fmt.fallback)


def layer_plan(cfg, widths: dict[str, int]) -> dict[str, LayerQuant]:
    """{name: LayerQuant} for the layers prepare() quantizes ({name: in_features}, in module order)."""
    recipe = getattr(cfg, "recipe", None)
    base = LayerQuant(cfg.grid, cfg.bits, cfg.group_size)
    idx = {n: int(m.group(1)) for n in widths if (m := _LAYER.search(n))}
    n_layers = max(idx.values()) + 1 if idx else 0
    plan = {}
    for name, k in widths.items():
        lq = base
        if recipe in _BASE and name in idx and use_more_bits(idx[name], n_layers) and (
                name.endswith("v_proj") or name.endswith("down_proj")):
            lq = LayerQuant("q6_k", 6, KGRID_SUB["q6_k"])
        plan[name] = _fallback(lq, k)
    return plan
