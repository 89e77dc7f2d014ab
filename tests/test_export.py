"""`lightreasoner export` without training: a LoRA adapter made here with PEFT on the tiny expert,
merged by run_export and checked against PEFT's own adapted model. (test_training.py checks
the export of an adapter that Ray Train + DeepSpeed trained, slowly.)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import LORA_CHECK_IDS
from lightreasoner_ray.config import load_config
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.stages.export import EXPORT_MARK, check_export_target, export_paths, run_export

IDS = torch.tensor(LORA_CHECK_IDS)


@pytest.fixture(scope="module")
def adapter(lora_adapter, tmp_path_factory):
    """The session's LoRA adapter, copied to ``<output_dir>/model`` where training puts one."""
    directory = tmp_path_factory.mktemp("export") / "run" / "model"
    shutil.copytree(lora_adapter["dir"], directory)
    return {**lora_adapter, "dir": directory}


def base_logits(tiny_pair):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(tiny_pair["expert"]).eval()(input_ids=IDS).logits


def test_the_merged_model_equals_the_adapted_one_and_replaces_the_output_whole(adapter, tiny_pair):
    from transformers import AutoModelForCausalLM

    output_dir = adapter["dir"].parent
    config = load_config(None, [f"output_dir={output_dir}"])
    assert export_paths(config) == (str(output_dir / "model"), str(output_dir / "merged"))
    stale = output_dir / "merged" / "stale.txt"
    stale.parent.mkdir()
    stale.write_text("from an earlier export")
    (stale.parent / EXPORT_MARK).write_text("{}")  # an earlier export's directory: export may replace it

    result = run_export(config)  # the base comes from adapter_config.json
    assert result["base"] == str(tiny_pair["expert"]) and result["output"] == str(output_dir / "merged")
    assert result["dtype"] == "float32"
    merged_dir = output_dir / "merged"
    assert not stale.exists() and (merged_dir / "tokenizer_config.json").is_file()
    assert not (merged_dir / "adapter_config.json").exists()
    assert json.loads((merged_dir / EXPORT_MARK).read_text())["adapter"] == str(output_dir / "model")
    assert [p.name for p in output_dir.iterdir() if p.name.startswith(".")] == []  # no staging left behind
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert result["parameters"] == sum(p.numel() for p in merged.parameters())
    with torch.no_grad():
        logits = merged(input_ids=IDS).logits
    torch.testing.assert_close(logits, adapter["adapted_logits"], rtol=1e-4, atol=1e-5)
    assert (logits - base_logits(tiny_pair)).abs().max() > 1e-3


def test_expert_path_overrides_the_recorded_base_and_dtype_is_honoured(adapter, tiny_pair, tmp_path):
    config = load_config(None, [f"export.adapter={adapter['dir']}", f"export.output={tmp_path / 'bf16'}",
                                f"expert.path={tiny_pair['expert']}", "export.dtype=bfloat16"])
    result = run_export(config)
    assert result["dtype"] == "bfloat16" and result["output"] == str(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_what_cannot_be_merged_is_refused_naming_it(adapter, tiny_pair, tmp_path):
    def refused(*overrides: str) -> str:
        with pytest.raises(LightReasonerError) as info:
            run_export(load_config(None, [f"output_dir={tmp_path}", *overrides]))
        return str(info.value)

    assert "does not exist (train first" in refused()
    assert "already a full model" in refused(f"export.adapter={tiny_pair['expert']}")
    (tmp_path / "not-an-adapter").mkdir()
    assert "has no adapter_config.json" in refused(f"export.adapter={tmp_path / 'not-an-adapter'}")
    assert "export works on local directories" in refused("export.output=s3://bucket/merged")
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    recorded = json.loads((adapter["dir"] / "adapter_config.json").read_text())
    (orphan / "adapter_config.json").write_text(json.dumps({**recorded, "base_model_name_or_path": ""}))
    assert "names no base model: set expert.path" in refused(f"export.adapter={orphan}")


def _tree(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target", ["output_dir", "other_data"])
def test_export_refuses_a_directory_it_did_not_write(adapter, tmp_path, target):
    """export.output naming a run's output_dir (or any other non-empty directory) is refused, and nothing is lost."""
    output_dir = adapter["dir"].parent
    results = output_dir / "eval" / "results.json"
    results.parent.mkdir(exist_ok=True)
    results.write_text('{"models": {}}')
    if target == "output_dir":
        destination = output_dir
    else:
        destination = tmp_path / "data"
        (destination / "sub").mkdir(parents=True)
        (destination / "sub" / "notes.txt").write_text("keep me")
    before = _tree(destination)
    config = load_config(None, [f"output_dir={output_dir}", f"export.output={destination}"])
    with pytest.raises(LightReasonerError, match="lightreasoner_export.json.*refusing to replace it") as caught:
        run_export(config)
    assert "\n" not in str(caught.value)
    assert ("a run's output_dir" in str(caught.value)) == (target == "output_dir")
    assert _tree(destination) == before
    assert [p.name for p in destination.parent.iterdir() if p.name.startswith(f".{destination.name}.")] == []


def test_export_replaces_an_older_unmarked_export_and_removes_a_killed_exports_leftovers(adapter, tmp_path, tiny_pair):
    """A model directory written before the mark (config.json, weights, tokenizer only) is still an export's;
    the hidden staging and retired copies a killed export left beside it are removed."""
    output_dir = adapter["dir"].parent
    destination = tmp_path / "old_merged"
    shutil.copytree(tiny_pair["expert"], destination)
    assert not (destination / EXPORT_MARK).exists()
    leftover = tmp_path / f".{destination.name}.0123abcd.tmp"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    retired = tmp_path / f".{destination.name}.4567ef.old"
    retired.mkdir()
    run_export(load_config(None, [f"output_dir={output_dir}", f"export.output={destination}"]))
    assert (destination / EXPORT_MARK).is_file()
    assert not leftover.exists() and not retired.exists()


def test_an_unmarked_export_with_any_file_save_pretrained_writes_is_replaceable_and_nothing_else(tiny_pair, tmp_path):
    """Oracle: what transformers' own save_pretrained writes (model, tokenizer, chat template) counts as an
    older export; the tokenizer files of other families and a chat_template.json too; one unrelated file does not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = tmp_path / "saved"
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair["expert"])
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    AutoModelForCausalLM.from_pretrained(tiny_pair["expert"]).save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    check_export_target(saved)  # no refusal
    older = tmp_path / "older"
    shutil.copytree(tiny_pair["expert"], older)
    for name in ("chat_template.json", "tokenizer.model", "spiece.model", "added_tokens.json",
                 "special_tokens_map.json", "merges.txt", "vocab.json", "generation_config.json"):
        (older / name).write_text("{}")
    check_export_target(older)
    (older / "notes.txt").write_text("keep me")
    with pytest.raises(LightReasonerError, match="refusing to replace it"):
        check_export_target(older)
