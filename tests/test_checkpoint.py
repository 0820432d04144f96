"""Checkpoint round trips (single file, sharded, bf16), LLaDA's tensor names, one named error
per kind of malformed checkpoint, and the checkpoint's tokenizer with LLaDA's chat template."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from illada_batch import load_model, save_checkpoint
from illada_batch.model.checkpoint import CheckpointError

torch.set_num_threads(1)

INDEX = "model.safetensors.index.json"
BLOCK_TENSORS = ["attn_norm", "ff_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"]

# LLaDA's chat template (as shipped in LLaDA-8B-Instruct's tokenizer_config.json)
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|eot_id|>", "<|start_header_id|>",
            "<|end_header_id|>"]


@pytest.fixture(scope="module")
def model(make_tiny_llada):
    return make_tiny_llada(seed=7, n_kv_heads=2)


@pytest.fixture(scope="module")
def ids(model):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (2, 11), generator=g)


@pytest.fixture
def saved(model, tmp_path):
    """A valid single-file checkpoint directory."""
    return save_checkpoint(model, tmp_path / "ckpt")


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


def expected_names(cfg) -> set[str]:
    names = {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"}
    for i in range(cfg.n_layers):
        names |= {f"model.transformer.blocks.{i}.{t}.weight" for t in BLOCK_TENSORS}
    return names


def stored_names(directory) -> dict[str, tuple]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                assert name not in out, f"{name} stored twice"
                out[name] = tuple(h.get_slice(name).get_shape())
    return out


# --- round trips ----------------------------------------------------------------------------


def test_single_file_round_trip(model, ids, saved):
    assert (saved / "config.json").exists() and (saved / "model.safetensors").exists()
    assert not (saved / INDEX).exists()
    loaded = load_model(saved, device="cpu", dtype=torch.float32)
    assert loaded.config == model.config
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert not loaded.training
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert not any(p.is_meta for p in loaded.parameters())


def test_sharded_round_trip(model, ids, tmp_path):
    directory = save_checkpoint(model, tmp_path / "sharded", max_shard_bytes=16 * 1024)
    shards = sorted(directory.glob("*.safetensors"))
    assert len(shards) >= 3
    assert not (directory / "model.safetensors").exists()
    index = json.loads((directory / INDEX).read_text())
    assert set(index["weight_map"]) == expected_names(model.config)
    assert {directory / f for f in index["weight_map"].values()} == set(shards)
    loaded = load_model(directory, device="cpu", dtype=torch.float32)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_bf16_load(model, ids, saved):
    loaded = load_model(saved, device="cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    out = logits(loaded, ids)
    assert out.dtype == torch.bfloat16
    ref = logits(model, ids)
    assert torch.isfinite(out.float()).all()
    scale = ref.abs().max()
    assert (out.float() - ref).abs().max() < 0.05 * scale
    # greedy predictions agree almost everywhere
    assert (out.float().argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_saved_tensor_names_are_llada_names(model, saved):
    shapes = stored_names(saved)
    assert set(shapes) == expected_names(model.config)
    cfg = model.config
    hd = cfg.d_model // cfg.n_heads
    assert shapes["model.transformer.wte.weight"] == (cfg.embedding_size, cfg.d_model)
    assert shapes["model.transformer.ff_out.weight"] == (cfg.embedding_size, cfg.d_model)
    assert shapes["model.transformer.ln_f.weight"] == (cfg.d_model,)
    assert shapes["model.transformer.blocks.1.q_proj.weight"] == (cfg.n_heads * hd, cfg.d_model)
    assert shapes["model.transformer.blocks.1.k_proj.weight"] == (cfg.n_kv_heads * hd, cfg.d_model)
    assert shapes["model.transformer.blocks.0.ff_out.weight"] == (cfg.d_model, cfg.mlp_hidden_size)
    raw = json.loads((saved / "config.json").read_text())
    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size",
                "embedding_size", "mask_token_id", "eos_token_id"):
        assert raw[key] == getattr(cfg, key), key


# --- malformed checkpoints -----------------------------------------------------------------


def rewrite_weights(directory, change):
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def rewrite_config(directory, **fields):
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    raw.update(fields)
    path.write_text(json.dumps(raw))


def load_error(directory) -> str:
    with pytest.raises(CheckpointError) as err:
        load_model(directory, device="cpu", dtype=torch.float32)
    return str(err.value)


def test_missing_tensor(saved):
    rewrite_weights(saved, lambda t: t.pop("model.transformer.blocks.1.v_proj.weight"))
    msg = load_error(saved)
    assert "missing" in msg and "model.transformer.blocks.1.v_proj.weight" in msg


def test_unexpected_tensor(saved):
    rewrite_weights(saved, lambda t: t.update({"model.transformer.blocks.0.attn.bias": torch.zeros(4)}))
    msg = load_error(saved)
    assert "unexpected" in msg and "model.transformer.blocks.0.attn.bias" in msg


def test_misshaped_tensor(saved):
    def change(t):
        t["model.transformer.blocks.0.k_proj.weight"] = torch.zeros(32, 32)  # GQA wants (16, 32)

    rewrite_weights(saved, change)
    msg = load_error(saved)
    assert "model.transformer.blocks.0.k_proj.weight" in msg and "(32, 32)" in msg and "(16, 32)" in msg


@pytest.mark.parametrize("field,value", [("alibi", True), ("include_bias", True), ("include_qkv_bias", True),
                                         ("layer_norm_type", "default"), ("activation_type", "gelu")])
def test_unsupported_config_field(saved, field, value):
    rewrite_config(saved, **{field: value})
    msg = load_error(saved)
    assert repr(field) in msg or field in msg
    assert "config.json" in msg


def test_missing_config_field(saved):
    path = saved / "config.json"
    raw = json.loads(path.read_text())
    del raw["d_model"]
    path.write_text(json.dumps(raw))
    assert "d_model" in load_error(saved)


def test_invalid_json_config(saved):
    (saved / "config.json").write_text('{"d_model": 32, "n_layers": 2,')
    msg = load_error(saved)
    assert "config.json" in msg and "JSON" in msg


def test_missing_config_json(saved):
    (saved / "config.json").unlink()
    assert "config.json" in load_error(saved)


class _Tripwire:
    """Unpickling this creates a file: proof that the loader unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_only_directory_is_refused_without_unpickling(model, tmp_path):
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(model.config.to_dict()))
    tripwire = tmp_path / "unpickled.txt"
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps({"x": _Tripwire(tripwire)}))
    msg = load_error(directory)
    assert "safetensors" in msg and "pytorch_model.bin" in msg
    assert not tripwire.exists()


def test_index_naming_a_missing_shard(model, tmp_path):
    directory = save_checkpoint(model, tmp_path / "sharded", max_shard_bytes=16 * 1024)
    victim = sorted(directory.glob("*.safetensors"))[1]
    victim.unlink()
    msg = load_error(directory)
    assert victim.name in msg and "missing" in msg


def test_index_naming_a_tensor_its_shard_lacks(model, tmp_path):
    directory = save_checkpoint(model, tmp_path / "sharded", max_shard_bytes=16 * 1024)
    index = json.loads((directory / INDEX).read_text())
    name = "model.transformer.blocks.1.up_proj.weight"
    shard = directory / index["weight_map"][name]
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    msg = load_error(directory)
    assert name in msg and shard.name in msg


def test_index_without_weight_map(model, tmp_path):
    directory = save_checkpoint(model, tmp_path / "sharded", max_shard_bytes=16 * 1024)
    (directory / INDEX).write_text(json.dumps({"metadata": {}}))
    assert "weight_map" in load_error(directory)


def test_no_such_directory(tmp_path):
    msg = load_error(tmp_path / "nowhere")
    assert "nowhere" in msg


# --- tokenizer -----------------------------------------------------------------------------


def write_tokenizer(directory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = ["hi", "hello", "world", "user", "assistant", "!", "[UNK]"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.add_special_tokens(SPECIALS)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "mask_token": "<|mdm_mask|>", "chat_template": CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return vocab


def test_no_tokenizer_when_the_checkpoint_has_none(saved):
    assert load_model(saved, device="cpu", dtype=torch.float32).tokenizer is None


def test_tokenizer_and_chat_template(saved):
    vocab = write_tokenizer(saved)
    tok = load_model(saved, device="cpu", dtype=torch.float32).tokenizer
    assert tok is not None
    ids = tok.encode("hello world !")
    assert ids == [vocab["hello"], vocab["world"], vocab["!"]]
    assert tok.decode(ids) == "hello world !"
    assert tok.encode("goodbye") == [vocab["[UNK]"]]
    assert tok.bos_id == vocab["<|startoftext|>"] and tok.eot_id == vocab["<|eot_id|>"]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    # the special tokens of the template are single tokens
    assert tok.encode(text) == [vocab[t] for t in ["<|startoftext|>", "<|start_header_id|>", "user",
                                                   "<|end_header_id|>", "hi", "<|eot_id|>",
                                                   "<|start_header_id|>", "assistant", "<|end_header_id|>"]]
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "user hi assistant"
    no_prompt = tok.apply_chat_template([{"role": "user", "content": " hi "}], add_generation_prompt=False)
    assert no_prompt == "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"


# --- where the loaded weights live ------------------------------------------------------------


def _file_mappings(directory) -> list[tuple[int, int]]:
    """This process's address ranges mapped from a file under ``directory`` (/proc/self/maps)."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5].startswith(str(directory)):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tp", [None, (0, 2), (1, 2)])
def test_loaded_weights_are_the_process_own_memory_not_the_file_mapping(model, tmp_path, dtype, tp):
    """As a GPU load: every weight is copied out of the safetensors file, whole or as a rank's
    slice, also when no dtype conversion copies it. A weight left in the file's mapping counts
    toward the process's memory only once read (a peak under the weights it holds) and is
    dropped and read again from disk under memory pressure."""
    from illada_batch.model.layers.linear import TPGroup

    directory = save_checkpoint(model, tmp_path / "ckpt", dtype=dtype)
    loaded = load_model(directory, device="cpu", dtype=dtype, tp=None if tp is None else TPGroup(*tp))
    mapped = _file_mappings(directory)
    inside = [name for name, p in loaded.named_parameters()
              if any(lo <= p.data_ptr() < hi for lo, hi in mapped)]
    assert inside == []
    assert all(p.dtype == dtype for p in loaded.parameters())
