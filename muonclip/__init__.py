"""MuonClip: the optimizer of Kimi K2 (Muon for hidden matrices + AdamW for the rest, and QK-Clip).

Usable on its own with any model::

    import muonclip
    groups = muonclip.build_param_groups(model.named_parameters(), weight_decay=0.1)
    opt = muonclip.MuonClip(groups, lr=2e-3)
    clip = muonclip.QKClip(model.qk_clip_specs(), tau=100.0)  # needs per-head max logits from the model
    clip.register(opt)  # runs after every opt.step()

or, to guarantee every head's max logit <= tau on the step's batch after each step (one extra no-grad forward)::

    opt.step()
    model.eval()
    clip.apply_post_step(lambda: model(inputs))  # re-measures with the updated weights, clips layer by layer
    model.train()
"""
from muonclip.distributed import DistributedMuonClip, OptimizerGroups
from muonclip.muon import adamw_step_, apply_muon_update_, muon_momentum_, muon_scale, muon_update, orthogonalize
from muonclip.newton_schulz import NS_COEFFICIENTS, NS_SCHEDULES, newton_schulz
from muonclip.optimizer import MuonClip
from muonclip.param_groups import (DEFAULT_GROUP_OPTIONS, DEFAULT_RULES, assign_params, build_param_groups, coverage,
                                   format_coverage)
from muonclip.qk_clip import QKClip

__all__ = [
    "DEFAULT_GROUP_OPTIONS", "DEFAULT_RULES", "DistributedMuonClip", "MuonClip", "OptimizerGroups", "NS_COEFFICIENTS", "NS_SCHEDULES", "QKClip", "adamw_step_",
    "apply_muon_update_", "assign_params", "build_param_groups", "coverage", "format_coverage", "muon_momentum_", "muon_scale", "muon_update",
    "newton_schulz", "orthogonalize",
]
