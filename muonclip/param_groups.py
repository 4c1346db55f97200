"""Route named parameters to Muon or AdamW with ordered regex rules (first match wins).

A rule is ``(regex, group_key)``; the regex is searched (``re.search``) in the parameter's name. Rules whose
group uses Muon only match parameters with ndim >= 2, so a 1-D tensor falls through to a later rule. Every
parameter must end in exactly one group: a rule set without a catch-all that leaves a parameter unmatched, or
the same tensor passed under two names, is a ValueError listing the names.

A hidden matrix (ndim >= 2) may go to AdamW only through a rule that names it: one that reaches an AdamW group
through a catch-all rule (a regex matching any name, like ``"."``) is a ValueError naming it, because that is
the usual silent Muon bug (a custom rule set whose Muon rule misses a new layer). ``coverage`` counts what each
rule received, for the start-up table (launch/trainer.py logs it).

Parameters with ``requires_grad=False`` (e.g. the aux-loss-free router bias ``e_score_correction_bias``) are
routed like the others; they never receive a gradient, so the optimizer leaves them alone, but the groups still
cover the whole model.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from torch import Tensor, nn

Rule = tuple[str, str]

DEFAULT_RULES: tuple[Rule, ...] = (
    (r"(^|\.)e_score_correction_bias$", "adamw_no_decay"),  # router bias, updated by its own rule
    (r"(^|\.)(embed_tokens|tok_embeddings|embeddings?|wte|wpe|lm_head|output)\.weight$", "adamw"),
    (r"(norm|(^|\.)ln_\w*)\.weight$", "adamw_no_decay"),  # RMSNorm / LayerNorm gains
    (r"(^|\.)bias$", "adamw_no_decay"),
    (r".", "muon"),  # every other matrix / [E, A, B] expert stack (Muon rules only match >= 2-D)
    (r".", "adamw"),  # catch-all for anything else
)

DEFAULT_GROUP_OPTIONS: dict[str, dict[str, Any]] = {
    "muon": {"use_muon": True},
    "adamw": {"use_muon": False},
    "adamw_no_decay": {"use_muon": False, "weight_decay": 0.0},
}


def _named_list(named_params: Iterable[tuple[str, Tensor]] | nn.Module) -> list[tuple[str, Tensor]]:
    if isinstance(named_params, nn.Module):
        return list(named_params.named_parameters())
    out = list(named_params)
    for item in out:
        ok = isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], Tensor)
        if not ok:
            raise ValueError(f"build_param_groups expects (name, tensor) pairs (e.g. model.named_parameters()), "
                             f"got {type(item).__name__}")
    return out


def _group_options(rules: Iterable[Rule], group_options: Mapping[str, Mapping[str, Any]] | None,
                   weight_decay: float | None) -> dict[str, dict[str, Any]]:
    merged = {k: dict(v) for k, v in DEFAULT_GROUP_OPTIONS.items()}
    for key, opts in (group_options or {}).items():
        merged.setdefault(key, {}).update(opts)
    used = {key for _, key in rules}
    for key in used:
        if key not in merged:
            raise ValueError(f"param group {key!r} used by a rule has no options: pass group_options="
                             f"{{{key!r}: {{'use_muon': True or False, ...}}}} or use one of {sorted(merged)}")
        if not isinstance(merged[key].get("use_muon"), bool):
            raise ValueError(f"param group {key!r} needs a boolean 'use_muon' option, got {merged[key]!r}")
        if weight_decay is not None:
            merged[key].setdefault("weight_decay", weight_decay)
    return merged


def assign_params(named_params: Iterable[tuple[str, Tensor]] | nn.Module, rules: Iterable[Rule] = DEFAULT_RULES,
                  group_options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, str]:
    """Return {param name: group key}; raise ValueError on duplicated or unassigned parameters."""
    named = _named_list(named_params)
    rules = tuple(rules)
    options = _group_options(rules, group_options, None)
    try:
        compiled = [(re.compile(pattern), key) for pattern, key in rules]
    except (re.error, TypeError, ValueError) as e:
        raise ValueError(f"bad param-group rule in {rules!r}: {e}; rules are (regex, group_key) pairs") from e

    seen_names: dict[str, int] = {}
    seen_ids: dict[int, str] = {}
    duplicated: list[str] = []
    for name, p in named:
        if name in seen_names:
            duplicated.append(f"{name} (name given twice)")
        elif id(p) in seen_ids:
            duplicated.append(f"{name} (same tensor as {seen_ids[id(p)]})")
        seen_names[name] = 1
        seen_ids.setdefault(id(p), name)
    if duplicated:
        raise ValueError("parameters must be given exactly once; duplicated: " + ", ".join(duplicated)
                         + " (use model.named_parameters(), which drops tied duplicates)")

    assignment: dict[str, str] = {}
    unassigned: list[str] = []
    hidden_to_adamw: list[str] = []
    for name, p in named:
        for regex, key in compiled:
            if options[key]["use_muon"] and p.ndim < 2:
                continue
            if regex.search(name):
                assignment[name] = key
                if p.ndim >= 2 and not options[key]["use_muon"] and _is_catch_all(regex):
                    hidden_to_adamw.append(f"{name} {tuple(p.shape)} (rule {regex.pattern!r} -> {key!r})")
                break
        else:
            unassigned.append(f"{name} {tuple(p.shape)}")
    if unassigned:
        raise ValueError("no param-group rule matched: " + ", ".join(unassigned)
                         + "; add a rule for them or end the rules with a catch-all ('.', 'adamw')")
    if hidden_to_adamw:
        raise ValueError(f"{len(hidden_to_adamw)} hidden matrices would go to AdamW only through a catch-all rule: "
                         + ", ".join(hidden_to_adamw[:5]) + "; route them to Muon (e.g. a ('.', 'muon') rule before "
                         "the catch-all) or, if AdamW is intended, add a rule that names them")
    return assignment


_PROBE_NAMES = ("x", "a.b.weight", "0", "Z_z")


def _is_catch_all(regex: re.Pattern) -> bool:
    """A rule that matches any name (".", ".*", "^", ""): it says nothing about which parameters it is for."""
    return all(regex.search(name) for name in _PROBE_NAMES)


def coverage(named_params: Iterable[tuple[str, Tensor]] | nn.Module, rules: Iterable[Rule] = DEFAULT_RULES,
             group_options: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """What each rule received, in rule order: ``{"rule", "group", "optimizer", "tensors", "elements"}`` (rules
    that received nothing are left out). Works on meta tensors, so global shapes can be counted before sharding."""
    named = _named_list(named_params)
    rules = tuple(rules)
    options = _group_options(rules, group_options, None)
    assignment = assign_params(named, rules, group_options)
    compiled = [(re.compile(pattern), key) for pattern, key in rules]
    rows = [{"rule": pattern, "group": key, "optimizer": "muon" if options[key]["use_muon"] else "adamw",
             "tensors": 0, "elements": 0} for pattern, key in rules]
    for name, p in named:
        key = assignment[name]
        index = next(i for i, (regex, k) in enumerate(compiled)
                     if k == key and regex.search(name) and (p.ndim >= 2 or not options[k]["use_muon"]))
        rows[index]["tensors"] += 1
        rows[index]["elements"] += p.numel()
    return [row for row in rows if row["tensors"]]


def format_coverage(rows: list[dict[str, Any]]) -> str:
    """The coverage rows as a small table with totals per optimizer (elements and share)."""
    total = sum(r["elements"] for r in rows) or 1
    lines = [f"{'optimizer':<9} {'group':<15} {'tensors':>7} {'elements':>14} {'share':>6}  rule"]
    for r in rows:
        lines.append(f"{r['optimizer']:<9} {r['group']:<15} {r['tensors']:>7} {r['elements']:>14,} "
                     f"{100 * r['elements'] / total:>5.1f}%  {r['rule']}")
    for opt in ("muon", "adamw"):
        n = sum(r["elements"] for r in rows if r["optimizer"] == opt)
        t = sum(r["tensors"] for r in rows if r["optimizer"] == opt)
        lines.append(f"{opt:<9} {'(total)':<15} {t:>7} {n:>14,} {100 * n / total:>5.1f}%")
    return "\n".join(lines)


def build_param_groups(
    named_params: Iterable[tuple[str, Tensor]] | nn.Module,
    rules: Iterable[Rule] = DEFAULT_RULES,
    *,
    weight_decay: float | None = None,
    group_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Param groups for ``MuonClip``: one per group key that received parameters, in rule order.

    Each group is ``{"params": [...], "names": [...], "group": key, "use_muon": bool, **options}``.
    ``group_options`` adds or overrides per-group options, e.g. ``{"adamw": {"lr": 3e-4}}`` or a new key
    ``{"experts": {"use_muon": True, "lr": 1e-2}}`` used by a custom rule. ``weight_decay``, when given, is set
    on every group that does not fix its own (``adamw_no_decay`` keeps 0.0); otherwise groups inherit the
    optimizer's default.
    """
    named = _named_list(named_params)
    rules = tuple(rules)
    options = _group_options(rules, group_options, weight_decay)
    assignment = assign_params(named, rules, group_options)
    groups: dict[str, dict[str, Any]] = {}
    for _, key in rules:
        if key not in groups:
            groups[key] = {"params": [], "names": [], "group": key, **options[key]}
    for name, p in named:
        groups[assignment[name]]["params"].append(p)
        groups[assignment[name]]["names"].append(name)
    return [g for g in groups.values() if g["params"]]
