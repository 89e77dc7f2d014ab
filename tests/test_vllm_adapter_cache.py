"""The vLLM engine's adapter cache without vLLM: an adapter is merged into its base once, into a
directory keyed by the adapter's content, and that directory serves the adapted model.
(test_vllm_engine.py serves such a merge through vLLM, slowly.)"""

from __future__ import annotations

import shutil

import torch

from conftest import LORA_CHECK_IDS
from lightreasoner_ray.engines.base import EngineSpec
from lightreasoner_ray.engines.vllm import adapter_fingerprint, merged_model_dir
from lightreasoner_ray.io.layout import CACHE_ENV


def test_an_adapter_is_merged_once_per_content_and_serves_the_adapted_model(lora_adapter, tiny_pair, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_adapter["dir"], adapter)
    spec = EngineSpec(model_path=str(adapter), max_new_tokens=4, batch_size=1, dtype="float32")

    merged = merged_model_dir(spec)
    key = adapter_fingerprint(str(adapter), str(tiny_pair["expert"]), "float32")
    assert merged == str(tmp_path / "cache" / "merged" / key)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(LORA_CHECK_IDS)).logits
    torch.testing.assert_close(logits, lora_adapter["adapted_logits"], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "cache" / "merged" / key / "tokenizer_config.json").is_file()

    # Asked again: the cached merge, untouched; no staging directory left beside it.
    written = (tmp_path / "cache" / "merged" / key / "config.json").stat().st_mtime_ns
    assert merged_model_dir(spec) == merged
    assert (tmp_path / "cache" / "merged" / key / "config.json").stat().st_mtime_ns == written
    assert [p.name for p in (tmp_path / "cache" / "merged").iterdir()] == [key]

    # The key follows the content (not the path or mtimes), the base and the dtype.
    moved = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(adapter, moved)
    assert adapter_fingerprint(str(moved), str(tiny_pair["expert"]), "float32") == key
    assert adapter_fingerprint(str(adapter), str(tiny_pair["expert"]), "bfloat16") != key
    assert adapter_fingerprint(str(adapter), "/another/base", "float32") != key
    weights = next(moved.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert adapter_fingerprint(str(moved), str(tiny_pair["expert"]), "float32") != key


def test_a_plain_model_is_served_from_where_it_is(tiny_pair, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    spec = EngineSpec(model_path=str(tiny_pair["expert"]), max_new_tokens=4, batch_size=1)
    assert merged_model_dir(spec) == str(tiny_pair["expert"])
    assert not (tmp_path / "cache").exists()
