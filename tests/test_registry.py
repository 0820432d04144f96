"""The family registry: config.json picks the family (LLaDA-MoE shares LLaDA's model_type);
unknown families, self-contradicting configs and checkpoints missing or mis-shaping a
tensor are refused in one line that names what is wrong; a card's parameter counts and KV
bytes are the model's own."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from illada_batch.errors import CheckpointError
from illada_batch.model import registry
from illada_batch.model.checkpoint import MODELS_DIR, load_model
from illada_batch.model.configs.llada_moe import LLaDAMoEConfig


def copy_of(family_checkpoint, tmp_path, name="llada-moe"):
    return shutil.copytree(family_checkpoint(name), tmp_path / name)


def edit_config(directory, **fields):
    raw = json.loads((directory / "config.json").read_text())
    raw.update(fields)
    (directory / "config.json").write_text(json.dumps(raw))


def load_error(directory) -> str:
    with pytest.raises(CheckpointError) as err:
        load_model(directory, device="cpu")
    assert "\n" not in str(err.value)
    return str(err.value)


def test_the_family_comes_from_model_type_architectures_and_experts(family_checkpoint):
    moe = registry.read_config(family_checkpoint("llada-moe") / "config.json")
    assert moe["model_type"] == "llada"  # as the published LLaDA-MoE-7B-A1B says
    assert registry.family_of(moe).name == "llada-moe"
    assert registry.family_of({**moe, "model_type": "lladamoe"}).name == "llada-moe"
    assert registry.family_of({k: v for k, v in moe.items() if k != "architectures"}).name == "llada-moe"
    assert registry.family_of(registry.read_config(MODELS_DIR / "tiny-llada" / "config.json")).name == "llada"
    assert type(load_model(family_checkpoint("llada-moe"), device="cpu")).__name__ == "LLaDAMoE"


def test_an_unknown_family_is_refused_naming_what_the_config_says(family_checkpoint, tmp_path):
    directory = copy_of(family_checkpoint, tmp_path)
    edit_config(directory, model_type="mamba", architectures=["MambaForCausalLM"])
    msg = load_error(directory)
    assert "'mamba'" in msg and "MambaForCausalLM" in msg
    assert all(f.name in msg for f in registry.FAMILIES)


@pytest.mark.parametrize("field,value", [("num_experts_per_tok", 9), ("num_key_value_heads", 3),
                                         ("partial_rotary_factor", 0.0), ("partial_rotary_factor", 1.5),
                                         ("num_attention_heads", 5), ("moe_layer_freq", [0, 1]),
                                         ("moe_router_score_function", "sigmoid"), ("mask_token_id", 5000)])
def test_a_self_contradicting_config_is_refused_naming_the_field(family_checkpoint, tmp_path, field, value):
    directory = copy_of(family_checkpoint, tmp_path)
    edit_config(directory, **{field: value})
    msg = load_error(directory)
    assert repr(field) in msg and "config.json" in msg


def rewrite(directory, change):
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_a_missing_expert_tensor_is_named_with_its_shape(family_checkpoint, tmp_path):
    directory = copy_of(family_checkpoint, tmp_path)
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    rewrite(directory, lambda t: t.pop(name))
    msg = load_error(directory)
    assert "missing" in msg and name in msg and "(32, 64)" in msg


@pytest.mark.parametrize("name,shape", [("model.layers.1.mlp.gate.weight", (7, 64)),
                                        ("model.layers.0.self_attn.k_proj.weight", (64, 64)),
                                        ("model.layers.1.mlp.expert_bias", (9,))])
def test_a_misshaped_tensor_is_named_with_both_shapes(family_checkpoint, tmp_path, name, shape):
    directory = copy_of(family_checkpoint, tmp_path)
    want = tuple(load_file(str(directory / "model.safetensors"))[name].shape)
    rewrite(directory, lambda t: t.update({name: torch.zeros(shape)}))
    msg = load_error(directory)
    assert name in msg and str(shape) in msg and str(want) in msg


@settings(max_examples=25, deadline=None)
@given(layers=st.integers(1, 4), heads=st.sampled_from([(4, 4), (4, 2), (4, 1), (8, 2)]), experts=st.integers(1, 8),
       data=st.data())
def test_a_cards_parameters_and_kv_bytes_are_the_models(layers, heads, experts, data):
    top_k = data.draw(st.integers(1, experts))
    freq = tuple(data.draw(st.lists(st.integers(0, 1), min_size=layers, max_size=layers)))
    shared = data.draw(st.sampled_from([None, 24]))
    flags = data.draw(st.fixed_dictionaries({"qk_layernorm": st.booleans(), "attention_bias": st.booleans(),
                                             "moe_router_enable_expert_bias": st.booleans(),
                                             "tie_word_embeddings": st.booleans()}))
    cfg = LLaDAMoEConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=heads[0],
                         num_key_value_heads=heads[1], dense_intermediate_size=40, expert_intermediate_size=16,
                         num_experts=experts, num_experts_per_tok=top_k, moe_layer_freq=freq,
                         shared_expert_intermediate_size=shared, mask_token_id=2, eos_token_id=1, pad_token_id=1,
                         **flags)
    with torch.device("meta"):
        model = registry.model_class(registry.family_named("llada-moe"))(cfg)
    card = model.card
    assert card.parameters == sum(p.numel() for p in model.parameters())
    expert = 3 * 32 * 16
    assert card.parameters - card.active_parameters == sum(freq) * (experts - top_k) * expert
    assert card.kv_bytes_per_token(2) == 2 * layers * heads[1] * (32 // heads[0]) * 2
    assert card == registry.family_named("llada-moe").card(cfg)
