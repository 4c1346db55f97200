"""Parameter initialisation: modules declare a rule per parameter; values come from per-parameter generators.

A rule says how one parameter starts: normal(0, std), ones or zeros; ``per_expert`` marks a stack [E, ...] whose
experts are drawn one by one. ``fill_`` draws a parameter, or the slice of it one rank holds, from a generator
seeded by (seed, global parameter name[, expert index]). Every element's value therefore depends only on the seed
and the parameter's global name, never on the order of initialisation or on how the tensor is split across
ranks: a rank that holds a shard initialises just that shard (parallel/init.py) and gets the same weights as one
process holding the whole model. A tensor-parallel slice is cut from the full matrix drawn one parameter at a
time; expert stacks draw only their own experts.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class InitRule:
    kind: str  # "normal", "ones" or "zeros"
    std: float = 0.0
    per_expert: bool = False  # [E, ...] stack: expert e is drawn from its own generator (seed, name, e)


ONES, ZEROS = InitRule("ones"), InitRule("zeros")


def normal(std: float, per_expert: bool = False) -> InitRule:
    return InitRule("normal", std, per_expert)


def prefixed(prefix: str, rules: dict[str, InitRule]) -> dict[str, InitRule]:
    return {f"{prefix}.{name}": rule for name, rule in rules.items()}


def param_seed(seed: int, name: str, index: int | None = None) -> int:
    digest = hashlib.sha256(f"{int(seed)}:{name}:{'' if index is None else index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generator(seed: int, name: str, index: int | None, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(param_seed(seed, name, index))


def _draw_dtype(dtype: torch.dtype) -> torch.dtype:
    """Random draws are made in >= float32 and rounded: a bf16 parameter starts as the rounded float32 value."""
    return torch.promote_types(dtype, torch.float32)


def _normal_(t: torch.Tensor, std: float, generator: torch.Generator) -> None:
    if t.dtype == _draw_dtype(t.dtype):
        t.normal_(0.0, std, generator=generator)
    else:
        draw = torch.empty(t.shape, dtype=_draw_dtype(t.dtype), device=t.device)
        t.copy_(draw.normal_(0.0, std, generator=generator))


@torch.no_grad()
def fill_(t: torch.Tensor, rule: InitRule, seed: int, name: str, expert_offset: int = 0,
          shard: tuple[int, int, tuple[int, ...]] | None = None) -> None:
    """Initialise ``t``, which holds global parameter ``name`` (whole, or experts ``expert_offset..`` of a stack,
    or ``shard = (dim, offset, global_shape)``: the slice ``[offset, offset + t.shape[dim])`` along ``dim``; of a
    stack, each expert drawn whole and sliced: expert tensor parallelism).
    A bf16 ``t`` gets the float32 draws rounded, so it starts as the float32 model rounded to bf16."""
    if rule.kind == "ones":
        t.fill_(1.0)
    elif rule.kind == "zeros":
        t.zero_()
    elif rule.per_expert and shard is not None:
        dim, offset, global_shape = shard
        for i in range(t.shape[0]):
            full = torch.empty(global_shape[1:], dtype=_draw_dtype(t.dtype), device=t.device)
            full.normal_(0.0, rule.std, generator=_generator(seed, name, expert_offset + i, t.device))
            t[i].copy_(full.narrow(dim - 1, offset, t.shape[dim]))
    elif rule.per_expert:
        for i in range(t.shape[0]):
            _normal_(t[i], rule.std, _generator(seed, name, expert_offset + i, t.device))
    elif shard is None:
        _normal_(t, rule.std, _generator(seed, name, None, t.device))
    else:
        dim, offset, global_shape = shard
        full = torch.empty(global_shape, dtype=_draw_dtype(t.dtype), device=t.device)
        full.normal_(0.0, rule.std, generator=_generator(seed, name, None, t.device))
        t.copy_(full.narrow(dim, offset, t.shape[dim]))


def init_module_(module: nn.Module, rules: dict[str, InitRule], seed: int | None = None, prefix: str = "") -> int:
    """Initialise every parameter of ``module`` by ``rules`` (keys: its parameter names) and reset its per-step
    statistics. ``seed`` None draws one from torch's global generator (so ``torch.manual_seed`` still decides);
    ``prefix`` makes the names global when ``module`` is part of a larger model. Returns the seed used."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    params = dict(module.named_parameters())
    if params.keys() != rules.keys():
        missing, extra = sorted(params.keys() - rules.keys()), sorted(rules.keys() - params.keys())
        raise ValueError(f"init rules do not match the parameters: no rule for {missing}, rules for absent {extra}")
    for name, p in params.items():
        fill_(p, rules[name], seed, prefix + name)
    if hasattr(module, "reset_step_stats"):  # the model's and the attention/router modules' own
        module.reset_step_stats()
    else:
        reset_step_stats_(module)
    return seed


def reset_step_stats_(module: nn.Module) -> None:
    """Reset the per-step statistics (attention max logits, expert loads) of every submodule that keeps some."""
    for m in module.modules():
        if m is not module and hasattr(m, "reset_step_stats"):
            m.reset_step_stats()
