"""attn 'varlen': packed documents see only themselves, like flash-attention 2's varlen path."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from pipeline.train.varlen import packed_kwargs, parity, register


def tiny_model(attn: str) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in Qwen2.5
        max_position_embeddings=256,
    )
    config._attn_implementation = attn
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


def test_packed_documents_match_each_document_alone():
    register()
    packed, alone = tiny_model("varlen"), tiny_model("sdpa")
    docs = [torch.randint(3, 300, (n,)) for n in (7, 19, 5)]
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        logits = packed(input_ids=ids, position_ids=pos, **packed_kwargs(pos)).logits[0]
        start = 0
        for doc in docs:
            own = alone(input_ids=doc[None]).logits[0]
            torch.testing.assert_close(logits[start : start + len(doc)], own)
            start += len(doc)
        # without the offsets the attention finds the documents from position_ids itself
        again = packed(input_ids=ids, position_ids=pos).logits[0]
    torch.testing.assert_close(again, logits)
    # and plain causal attention over the row differs: the documents would see each other
    with torch.no_grad():
        mixed = alone(input_ids=ids).logits[0]
    assert not torch.allclose(mixed[7:], logits[7:], atol=1e-3)


def test_offsets_cover_rows_and_documents():
    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])
    kw = packed_kwargs(pos)
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 5, 7, 10]
    assert kw["max_length_q"] == 3
    assert packed_kwargs(pos, max_length=5)["max_length_k"] == 5
    with pytest.raises(ValueError, match="restart at 0"):
        packed_kwargs(torch.tensor([[1, 2, 0, 1]]))


def test_padding_mask_is_refused():
    register()
    model = tiny_model("varlen")
    with pytest.raises(ValueError, match="without padding"):
        model(
            input_ids=torch.ones(2, 4, dtype=torch.long),
            attention_mask=torch.tensor([[1] * 4, [1, 1, 0, 0]]),
        )


def test_parity_check_on_this_device():
    assert parity("cpu") < 2e-2  # bf16 inputs against an fp32 reference


def test_padding_free_without_a_varlen_kernel_is_a_config_error(tmp_path):
    from pipeline.train.config import ConfigError, load_config

    path = tmp_path / "bad.yaml"
    path.write_text("base_model: x\npadding_free: true\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*padding_free needs attn_implementation"):
        load_config(path)


@pytest.mark.slow
def test_trl_trains_padding_free_with_varlen(tiny_base, tmp_path, news_task, monkeypatch):
    import pipeline.train.varlen as varlen
    from pipeline.train.config import load_config
    from pipeline.train.sft import train
    from tests.fixtures_vllm import ROOT, news_rows, write_alpaca

    documents: list[int] = []
    real = varlen._per_document

    def counting(q, k, v, cu, scale):  # the real kernel, counting the documents it sees
        documents.append(len(cu) - 1)
        return real(q, k, v, cu, scale)

    monkeypatch.setattr(varlen, "_per_document", counting)
    write_alpaca(news_task, news_rows()[:8], tmp_path / "data")
    config = load_config(ROOT / "configs" / "train" / "tiny-cpu.yaml").model_copy(
        update={
            "attn_implementation": "varlen",
            "padding_free": True,
            "per_device_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "max_steps": 2,
            "logging_steps": 1,
        }
    )
    metrics = train(config, tmp_path / "data", tmp_path / "adapter", str(tiny_base))
    losses = [h["loss"] for h in metrics["log_history"] if "loss" in h]
    assert len(losses) == 2 and all(0 < x < 100 for x in losses)
    assert documents and set(documents) == {4}  # 4 examples per row, each attending to itself
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
