"""Merge parity on the tiny model: faithful merges pass, corrupted ones are caught."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.train.merge import MANIFEST, MergeError, check_not_quantized, parity_inputs, verify


@pytest.fixture(scope="module")
def adapter(tiny_student):
    return tiny_student.parent / "adapter"


@pytest.fixture(scope="module")
def inputs(adapter):
    from transformers import AutoTokenizer

    return parity_inputs(AutoTokenizer.from_pretrained(adapter), adapter)


def test_merged_dir_is_complete_and_faithful(tiny_base, tiny_student, adapter):
    from transformers import AutoTokenizer, GenerationConfig

    manifest = json.loads((tiny_student / MANIFEST).read_text())
    parity = manifest["parity"]
    assert parity["ok"] and parity["dtype"] == "float32"
    assert parity["max_abs_diff"] <= parity["tolerance"] < parity["adapter_effect"]
    assert manifest["base"] == str(tiny_base)
    assert manifest["adapter"] == str(adapter)
    train_metrics = json.loads((adapter / "train_metrics.json").read_text())
    assert manifest["data_sha256"] == train_metrics["data_sha256"]
    assert manifest["train_config"]["lora"]["r"] == train_metrics["config"]["lora"]["r"]
    assert list(tiny_student.glob("*.safetensors"))
    assert not list(tiny_student.glob("adapter_*"))  # a plain model, not an adapter
    merged_tok = AutoTokenizer.from_pretrained(tiny_student)
    assert merged_tok.chat_template == AutoTokenizer.from_pretrained(tiny_base).chat_template
    eos = GenerationConfig.from_pretrained(tiny_student).eos_token_id
    eos = [eos] if isinstance(eos, int) else eos
    assert merged_tok.convert_tokens_to_ids("<|im_end|>") == eos[0]


def test_verify_recomputes_parity(tiny_base, tiny_student, adapter, inputs):
    parity = verify(str(tiny_base), adapter, tiny_student, inputs)
    assert parity.ok, parity
    assert parity.tokens == sum(len(i) for i in inputs) and parity.prompts == len(inputs)


def _lora_delta(adapter, module: str):
    """s·B·A for one module, from the adapter's own files."""
    from safetensors.torch import load_file

    weights = load_file(str(adapter / "adapter_model.safetensors"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    a = next(v for k, v in weights.items() if module in k and "lora_A" in k)
    b = next(v for k, v in weights.items() if module in k and "lora_B" in k)
    return (cfg["lora_alpha"] / cfg["r"]) * (b @ a)


@pytest.mark.parametrize("corruption", ["applied twice", "left out"])
def test_corrupted_merge_is_caught(tiny_base, tiny_student, adapter, inputs, tmp_path, corruption):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "merged"
    shutil.copytree(tiny_student, bad)
    (weights_file,) = bad.glob("*.safetensors")
    weights = load_file(str(weights_file))
    name = "model.layers.1.self_attn.o_proj.weight"
    delta = _lora_delta(adapter, "layers.1.self_attn.o_proj")
    weights[name] = weights[name] + (delta if corruption == "applied twice" else -delta)
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    parity = verify(str(tiny_base), adapter, bad, inputs)
    assert not parity.ok
    assert parity.max_abs_diff > 10 * parity.tolerance


def test_quantized_base_is_refused(tiny_base, adapter, tmp_path):
    from pipeline.train.merge import merge

    quantized = tmp_path / "base-4bit"
    shutil.copytree(tiny_base, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match="quantized"):
        check_not_quantized(str(quantized))
    with pytest.raises(MergeError, match=r"quantized \(bitsandbytes\)"):
        merge(str(quantized), adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
