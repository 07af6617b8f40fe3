"""--decay-exempt: which parameters AdamW's weight decay leaves alone. ``official`` follows each recipe's official
pretraining code (read from it: MAE and ConvNeXt V2 call timm 0.3.2's add_weight_decay with no skip list; SimMIM's
build_optimizer skips its ViT's no_weight_decay(), the class token and position embedding; I-JEPA's init_opt skips
1-D parameters and names holding "bias"; fairseq's data2vec 2.0 skips 1-D parameters and biases; mmpretrain's MaskFeat
skips 1-D parameters (flat_decay_mult 0: norms, biases, layer scales) and the mask token; mmselfsup's PixMIM (its MAE
config) skips ln, bias, pos_embed, mask_token, cls_token; openmixup's A2MIM skips norms, bias (which matches the
relative position tables), mask_token, pos_embed, cls_token and gamma). ``tokens`` is timm's convention and fastmim's
rule before the option. A resume that changes it keeps every parameter's moments (renumbered by name), and runs saved
before it keep their groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastmim
from fastmim import pretrain
from fastmim.config import migrate_saved_config
from fastmim.pretrain import resolve_config
from fastmim.train import checkpoint as ckpt
from fastmim.train.optim import build_adamw, decay_summary, param_groups, param_names, regroup_state, saved_param_names
from tests.conftest import TINY_ARGS


def _exempt(model: nn.Module, rule: str) -> set[str]:
    names = {p: n for n, p in model.named_parameters()}
    no_decay, decay = param_groups(model, 0.05, rule)
    assert not ({names[p] for p in no_decay["params"]} & {names[p] for p in decay["params"]})
    return {names[p] for p in no_decay["params"]}


def _decayed(model: nn.Module, rule: str) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad} - _exempt(model, rule)


# recipe -> (create_model arguments, decayed under official, exempt under official)
OFFICIAL = {
    "mae_vit_tiny_patch16": ({"vis_mask_ratio": 0.25}, {"cls_token", "mask_token", "vis_mask_token"}, set()),
    "pixmim_vit_tiny_patch16": ({}, set(), {"cls_token", "mask_token"}),
    "simmim_vit_tiny_patch16": (
        {"rel_pos_bias": "shared"},
        {"mask_token", "rel_pos_bias.relative_position_bias_table"},
        {"cls_token", "blocks.0.ls1.gamma"},
    ),
    "a2mim_vit_tiny_patch16": (
        {"rel_pos_bias": "block", "abs_pos_embed": "learned"},
        set(),
        {"cls_token", "mask_token", "pos_embed", "blocks.0.attn.relative_position_bias_table", "blocks.0.ls1.gamma"},
    ),
    "maskfeat_vit_tiny_patch16": (
        {"abs_pos_embed": "learned"},
        {"cls_token", "pos_embed"},
        {"mask_token", "blocks.0.ls1.gamma"},
    ),
    "ijepa_vit_tiny_patch16": ({}, {"mask_token"}, set()),
    "data2vec2_vit_tiny_patch16": ({}, {"cls_token"}, set()),
}


@pytest.mark.parametrize("model", list(OFFICIAL))
def test_official_rule_is_the_recipes_code(model):
    kwargs, decayed, exempt = OFFICIAL[model]
    if model.split("_")[0] in ("simmim", "a2mim", "maskfeat"):
        kwargs = {**kwargs, "init_values": 0.1}
    m = fastmim.create_model(model, img_size=64, **kwargs)
    official, tokens = _exempt(m, "official"), _exempt(m, "tokens")
    assert decayed <= _decayed(m, "official"), decayed - _decayed(m, "official")
    assert exempt <= official, exempt - official
    for n, p in m.named_parameters():  # biases and 1-D parameters (norms, layer scales) never decay, either rule
        if p.requires_grad and (n.endswith(".bias") or p.ndim == 1):
            assert n in official and n in tokens, n
    assert {n for n, p in m.named_parameters() if p.ndim >= 2 and "token" not in n and "table" not in n
            and "pos_embed" not in n} & official == set()  # matrices and convolutions always decay  # fmt: skip
    # tokens: every class and mask token and a learned position embedding exempt (fastmim's rule before the option)
    assert {n for n in m.state_dict() if n.endswith("_token") and not n.startswith("teacher.")} <= tokens
    fixed = {n for n, p in m.named_parameters() if "pos_embed" in n and not p.requires_grad}  # in no group
    assert fixed == {n for n, _ in m.named_parameters() if "pos_embed" in n} - tokens


def test_fcmae_official_rule_decays_the_mask_token_and_grn():
    m = fastmim.create_model("fcmae_convnextv2_atto", img_size=64)
    official, tokens = _exempt(m, "official"), _exempt(m, "tokens")
    grn = {n for n, _ in m.named_parameters() if ".grn." in n}
    assert grn and not grn & official and grn <= tokens  # (1, C) in ConvNeXt V2's code: decayed there
    assert "mask_token" not in official and "mask_token" in tokens
    assert "encoder.stem.1.weight" in official and "encoder.stages.0.blocks.0.mlp.fc1.bias" in official


def test_a_model_without_an_official_rule_takes_the_tokens_rule():
    class Mine(nn.Module):
        def __init__(self):
            super().__init__()
            self.token = nn.Parameter(torch.zeros(1, 1, 4))
            self.proj = nn.Linear(4, 4)

        def no_weight_decay(self):
            return {"token"}

    assert _exempt(Mine(), "official") == _exempt(Mine(), "tokens") == {"token", "proj.bias"}
    with pytest.raises(ValueError, match="decay_exempt must be one of official, tokens, got 'all'"):
        param_groups(Mine(), 0.05, "all")
    with pytest.raises(ValueError, match="decay_exempt must be one of official, tokens"):
        resolve_config(["--decay-exempt", "all"])


def _stepped(model: nn.Module, rule: str, steps: int = 3) -> torch.optim.Optimizer:
    opt = build_adamw(model, 1e-3, 0.05, exempt=rule)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt


def _moments_by_name(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict]:
    names = {p: n for n, p in model.named_parameters()}
    return {names[p]: opt.state[p] for g in opt.param_groups for p in g["params"] if p in opt.state}


def test_regrouped_state_keeps_each_parameters_moments():
    """tokens -> official moves the class and mask tokens between the groups: each keeps its own moments and step,
    the groups' settings are the new optimizer's; a state of another model is refused naming its parameters."""
    m = fastmim.create_model("mae_vit_tiny_patch16", img_size=64)
    old = _stepped(m, "tokens")
    saved, saved_names = old.state_dict(), param_names(m, old)
    new = build_adamw(m, 1e-3, 0.3, exempt="official")
    now = param_names(m, new)
    assert now != saved_names and sorted(now) == sorted(saved_names)
    new.load_state_dict(regroup_state(saved, saved_names, new, now))
    before, after = _moments_by_name(m, old), _moments_by_name(m, new)
    assert set(before) == set(after) == {n for n, p in m.named_parameters() if p.requires_grad}
    for n, st in before.items():
        for k, t in st.items():
            torch.testing.assert_close(after[n][k], t, rtol=0, atol=0, msg=lambda msg, n=n, k=k: f"{n}.{k}: {msg}")
    assert [g["weight_decay"] for g in new.param_groups] == [0.0, 0.3]
    decaying = {n for n, p in m.named_parameters() for g in new.param_groups if g["decays"] and any(p is q
                for q in g["params"])}  # fmt: skip
    assert {"cls_token", "mask_token"} <= decaying
    assert regroup_state(saved, saved_names, old, saved_names) is saved  # the same groups: as saved
    assert decay_summary(m, new) == "exempt: biases and 1-D parameters; decayed tokens: cls_token, mask_token"
    other = fastmim.create_model("mae_vit_tiny_patch16", img_size=64, decoder_depth=1)
    with pytest.raises(ValueError, match=r"does not fit this model's parameters .*not here: \['decoder_blocks.1"):
        regroup_state(saved, saved_names, build_adamw(other, 1e-3, 0.05), param_names(other, build_adamw(other, 0, 0)))


def test_a_rule_that_keeps_the_order_but_moves_the_group_boundary_is_regrouped():
    """The exempt group then the decayed one: a token (1, 4) exempt before and a (4, 4) weight decayed give the order
    [tok, w] under both rules, but the groups' sizes move from (1, 1) to (2, 0): the state is regrouped, not loaded
    as saved (which torch refuses)."""

    class Mine(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Parameter(torch.zeros(1, 4))
            self.w = nn.Parameter(torch.ones(4, 4))

        def no_weight_decay(self):
            return {"tok"}

        def official_no_decay(self, name, p):
            return name in ("tok", "w")

    m = Mine()
    old = _stepped(m, "tokens")
    new = build_adamw(m, 1e-3, 0.05, exempt="official")
    names = param_names(m, new)
    assert names == param_names(m, old) == ["tok", "w"]
    assert [len(g["params"]) for g in old.param_groups] != [len(g["params"]) for g in new.param_groups]
    new.load_state_dict(regroup_state(old.state_dict(), names, new, names))
    for n, st in _moments_by_name(m, old).items():
        torch.testing.assert_close(_moments_by_name(m, new)[n]["exp_avg"], st["exp_avg"], rtol=0, atol=0)


def test_a_checkpoint_from_before_the_option_is_numbered_by_the_tokens_rule():
    m = fastmim.create_model("simmim_vit_tiny_patch16", img_size=64)
    opt = _stepped(m, "tokens", steps=1)
    assert saved_param_names({}, m) == param_names(m, opt)
    assert saved_param_names({"optimizer_params": ["a", "b"]}, m) == ["a", "b"]
    # the tokens rule decays the relative position tables (as it did for the runs started with it), and says so
    biased = fastmim.create_model("simmim_vit_tiny_patch16", img_size=64, rel_pos_bias="block", depth=2)
    assert not {n for n, _ in biased.named_parameters() if n.endswith("table")} & _exempt(biased, "tokens")
    assert decay_summary(biased, build_adamw(biased, 1e-3, 0.05, exempt="tokens")).endswith(
        "decayed bias tables: blocks.*.attn.relative_position_bias_table"
    )
    sim = fastmim.create_model("simmim_vit_tiny_patch16", img_size=64, rel_pos_bias="shared", depth=1)
    assert decay_summary(sim, build_adamw(sim, 1e-3, 0.05)).endswith(
        "decayed tokens: mask_token; decayed bias tables: rel_pos_bias.relative_position_bias_table"
    )  # SimMIM's rule decays its table: the start-up line says so
    assert migrate_saved_config({"model": "mae_vit_base_patch16"}, 3)["decay_exempt"] == "tokens"
    assert migrate_saved_config({"model": "mae_vit_base_patch16", "decay_exempt": "official"}, 3)["decay_exempt"] \
        == "official"  # fmt: skip
    assert "decay_exempt" not in migrate_saved_config({"model": "mae_vit_base_patch16"}, 4)


def _run(image_folder, out, *extra) -> None:
    pretrain.run([*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--log-interval", "1",
                  "--vis-interval", "100", "--loader", "torch", *extra])  # fmt: skip


def _states_by_name(state: dict) -> dict[str, dict]:
    return {state["optimizer_params"][i]: st for i, st in state["optimizer"]["state"].items()}


def _assert_same(a: dict, b: dict) -> None:
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    sa, sb = _states_by_name(a), _states_by_name(b)
    assert set(sa) == set(sb)
    for n, st in sa.items():
        for k, t in st.items():
            tol = 1e-5 * float(t.abs().max()) if t.numel() and t.is_floating_point() else 0.0
            torch.testing.assert_close(sb[n][k], t, rtol=0, atol=tol, msg=lambda m, w=f"{n}.{k}": f"{w}: {m}")


@pytest.mark.slow
def test_resume_with_another_rule_continues_each_parameters_moments(image_folder, tmp_path, capsys):
    """A run stopped at step 3 under the tokens rule, then resumed to step 6 twice from the same checkpoint: once
    keeping the rule, once switching to official, both with weight decay 0 (so the groups cannot matter): the same
    weights and moments, parameter by parameter. Also from a checkpoint made to look like one from before the option
    (no parameter names, config format 3, no decay_exempt): it resumes with the tokens rule, unchanged. The switch
    is said and recorded; the resumed checkpoint's groups are the official ones."""
    import shutil

    first = tmp_path / "first"
    capsys.readouterr()
    _run(image_folder, first, "--decay-exempt", "tokens", "--max-steps", "3")
    first_out = capsys.readouterr().out
    old = tmp_path / "before-the-option"
    shutil.copytree(first, old)
    state = ckpt.load_checkpoint(old / ckpt.CHECKPOINT_NAME)
    del state["optimizer_params"]
    state["config_format"] = 3
    del state["config"]["decay_exempt"]
    torch.save(state, old / ckpt.CHECKPOINT_NAME)
    runs = {}
    for name, src, rule in (("keep", first, []), ("switch", first, ["--decay-exempt", "official"]),
                            ("old", old, [])):  # fmt: skip
        out = tmp_path / name
        shutil.copytree(src, out)
        capsys.readouterr()
        pretrain.run(["--resume", "--output-dir", str(out), "--max-steps", "6", "--weight-decay", "0", *rule])
        runs[name] = (ckpt.load_checkpoint(out / ckpt.CHECKPOINT_NAME), capsys.readouterr().out)
    _assert_same(runs["keep"][0], runs["switch"][0])
    _assert_same(runs["keep"][0], runs["old"][0])
    assert "decay_exempt tokens -> official" in runs["switch"][1]
    assert "weight decay 0: none" in runs["switch"][1]
    assert "weight decay 0.05 (--decay-exempt tokens): exempt: biases and 1-D parameters, cls_token, mask_token; " \
        "decayed tokens: none" in first_out  # fmt: skip
    assert "decay_exempt" not in runs["keep"][1] and "decay_exempt" not in runs["old"][1]
    assert runs["old"][0]["config"]["decay_exempt"] == "tokens"
    switched = runs["switch"][0]
    assert switched["config"]["decay_exempt"] == "official"
    groups = switched["optimizer"]["param_groups"]
    decaying = {switched["optimizer_params"][i] for g in groups if g["decays"] for i in g["params"]}
    assert {"cls_token", "mask_token"} <= decaying
    assert "cls_token" not in {runs["keep"][0]["optimizer_params"][i] for g in runs["keep"][0]["optimizer"]
                               ["param_groups"] if g["decays"] for i in g["params"]}  # fmt: skip


@pytest.mark.slow
def test_a_changed_rule_resumes_across_checkpoint_formats(image_folder, tmp_path, capsys):
    """The tokens rule to step 3 (checkpoint.pt); resumed with --fsdp (one process) under the official rule to step 6
    (the whole state cut into shards, each parameter's moments in its new group); then without --fsdp under the
    tokens rule again to step 9 (the sharded checkpoint into whole weights, regrouped by name). With weight decay 0
    the groups cannot change the numbers: the run of one that kept its rule throughout. (The sharded save removes the
    older checkpoint.pt; an older one copied back in, the last resume names the run's folder, which holds both
    formats: the note says which one it takes.)"""
    import shutil

    ref, run = tmp_path / "ref", tmp_path / "run"
    _run(image_folder, ref, "--decay-exempt", "tokens", "--max-steps", "3")
    shutil.copytree(ref, run)
    shutil.copy(ref / ckpt.CHECKPOINT_NAME, tmp_path / "ref3.pt")
    pretrain.run(["--resume", "--output-dir", str(ref), "--max-steps", "9", "--weight-decay", "0"])
    pretrain.run(["--resume", "--output-dir", str(run), "--max-steps", "6", "--weight-decay", "0", "--fsdp",
                  "--decay-exempt", "official"])  # fmt: skip
    assert ckpt.run_checkpoint(run) == run / ckpt.DCP_NAME
    assert "note: removed checkpoint.pt (step 3): this run's checkpoint.dcp (step 6) replaces it" in \
        capsys.readouterr().out  # fmt: skip
    shutil.copy(tmp_path / "ref3.pt", run / ckpt.CHECKPOINT_NAME)  # an older one (step 3) copied back in
    capsys.readouterr()
    pretrain.run(["--resume", str(run), "--max-steps", "9", "--no-fsdp", "--decay-exempt", "tokens"])  # (its folder)
    assert "holds checkpoint.dcp (step 6) and checkpoint.pt (step 3, older;" in capsys.readouterr().out
    _assert_same(ckpt.load_checkpoint(ref / ckpt.CHECKPOINT_NAME), ckpt.load_checkpoint(run / ckpt.CHECKPOINT_NAME))


def test_a_timm_encoders_mae_decays_maes_tokens_and_keeps_timms_own_exempt():
    """MAE on a timm encoder (``fastmim.create_model("mae", encoder=...)``): MAE's rule for the class and mask tokens
    (they decay); the encoder's learned position embedding and register tokens, which MAE's ViT has not, keep timm's
    exemption."""
    timm = pytest.importorskip("timm", reason="timm is a test dependency")
    enc = timm.create_model("vit_tiny_patch16_224", img_size=64, reg_tokens=2, num_classes=0)
    m = fastmim.create_model("mae", encoder=enc, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2)
    official = _exempt(m, "official")
    assert {"encoder.pos_embed", "encoder.reg_token"} <= official
    assert {"encoder.cls_token", "mask_token"} <= _decayed(m, "official")
    assert {"encoder.cls_token", "encoder.pos_embed", "encoder.reg_token", "mask_token"} <= _exempt(m, "tokens")


def test_a_state_numbered_for_other_parameters_is_refused_by_shape():
    """Saved names that do not number the state as it was saved (a moment put on a parameter of another shape) are
    refused naming the parameter and both shapes, before the fused AdamW could read past a tensor's end."""
    m = fastmim.create_model("mae_vit_tiny_patch16", img_size=64)
    old = _stepped(m, "tokens", steps=1)
    new = build_adamw(m, 1e-3, 0.05, exempt="official")
    wrong = param_names(m, new)  # the official numbering, for a state saved in the tokens one
    with pytest.raises(ValueError, match=r"does not fit this model: exp_avg \(.*\) numbered for .* \(.*\) \(its "
                                         r"parameter names, optimizer_params, or the model differ\)"):  # fmt: skip
        regroup_state(old.state_dict(), wrong, new, param_names(m, new))
