"""Hub-ready outputs: the model card `export` writes (parsed back by huggingface_hub), the dataset
card of `export-samples` (read back by `datasets.load_dataset`), and pushing: refused before any
merge work when offline, without a token or with the Hub unreachable; uploaded through HfApi
(a recording stand-in here: no network) when it can be.

The run directory is made by hand from its records' real shapes: a LoRA adapter made with PEFT
(conftest's lora_adapter), the sampling and training records, results.json, and samples Parquet."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import LORA_CHECK_IDS

from lightreasoner_ray import cli
from lightreasoner_ray.config import load_config
from lightreasoner_ray.data.samples import SAMPLES_SCHEMA
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.fingerprints import weights_fingerprint
from lightreasoner_ray.io.layout import RunLayout
from lightreasoner_ray.stages import export as export_stage
from lightreasoner_ray.stages import hub
from lightreasoner_ray.stages.export import EXPORT_MARK, run_export

EXPERT_ID, AMATEUR_ID = "Qwen/Qwen2.5-Math-1.5B", "Qwen/Qwen2.5-0.5B"
RESULTS = {  # eval/results.json as the evaluation stage writes it (accuracy a fraction)
    "benchmarks": ["gsm8k", "math500", "svamp"],
    "settings": {"n": 1, "temperature": 0.0, "max_new_tokens": 2048},
    "models": {
        "baseline": {"benchmarks": {"gsm8k": {"accuracy": 0.425, "n": 1319, "correct": 561},
                                    "math500": {"accuracy": 0.342, "n": 500, "correct": 171},
                                    "svamp": {"accuracy": 0.5, "n": 1000, "correct": 500}}},
        "lightreasoner": {"benchmarks": {"gsm8k": {"accuracy": 0.70584, "n": 1319, "correct": 931},
                                         "math500": {"accuracy": 0.593, "n": 500, "correct": 296},
                                         "svamp": {"accuracy": 0.781, "n": 1000, "correct": 781}}},
    },
}
SAMPLE_ROWS = [
    {"problem_id": f"p{i}", "prompt_ids": [1, 2, 3 + i], "completion_ids": [7, 8, 9, 10], "steps": [1, 3],
     "kl": [0.5, 1.25], "target_ids": [[8, 11], [10]], "target_probs": [[0.75, 0.25], [1.0]],
     "position_kl": [0.1, 0.5, 0.2, 1.25]}
    for i in range(5)
]


def hub_cache_snapshot(root, model_id: str, source=None):
    """A Hugging Face cache snapshot path of ``model_id`` (a copy of ``source`` when given)."""
    org, name = model_id.split("/")
    path = root / "hub" / f"models--{org}--{name}" / "snapshots" / "0123abcd"
    if source is not None:
        shutil.copytree(source, path)
    return path


@pytest.fixture(scope="module")
def run(lora_adapter, tiny_pair, tmp_path_factory):
    """A finished run's output_dir: model/ (a LoRA adapter), records, results.json and two samples shards;
    the expert is a hub-cache snapshot of the tiny expert, so its Hub id is known."""
    root = tmp_path_factory.mktemp("hub")
    expert = hub_cache_snapshot(root, EXPERT_ID, tiny_pair["expert"])
    output_dir = root / "run"
    shutil.copytree(lora_adapter["dir"], output_dir / "model")
    (output_dir / "model" / "provenance.json").write_text(json.dumps({"step": 1000, "max_steps": 1000}))
    layout = RunLayout(str(output_dir))
    storage.write_json_atomic(layout.sampling_settings, {
        "expert": str(expert), "amateur": str(hub_cache_snapshot(root, AMATEUR_ID)), "alpha": 0.2, "beta": 0.4,
        "max_new_tokens": 128, "problems_source": "openai/gsm8k", "selection": "paper", "vocab_size": 600})
    storage.write_json_atomic(layout.samples_summary, {
        "counts": {"problems": 1000, "completion_tokens": 128000, "selected_steps": 23456}})
    storage.write_json_atomic(layout.train_summary, {
        "steps": 1000, "tuned_tokens": 12345, "final_loss": 0.123456789, "deepspeed_stage": 2, "workers": 4,
        "precision": "bf16", "train_config": {"lr": 5e-05, "steps_per_update": 16,
                                              "lora": {"r": 8, "alpha": 16, "dropout": 0.05,
                                                       "target_modules": ["q_proj", "v_proj"]}}})
    results = json.loads(json.dumps(RESULTS))
    results["models"]["baseline"]["path"] = str(expert)
    results["models"]["lightreasoner"]["path"] = str(output_dir / "model")
    storage.write_json_atomic(layout.results["json"], results)
    storage.make_dirs(layout.samples)
    for index, rows in enumerate((SAMPLE_ROWS[:3], SAMPLE_ROWS[3:])):
        storage.write_parquet_atomic(pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA), layout.samples,
                                     f"part-{index}.parquet")
    return {"dir": output_dir, "expert": expert, "layout": layout, "adapted_logits": lora_adapter["adapted_logits"]}


def export_config(run, *overrides: str):
    return load_config(None, [f"output_dir={run['dir']}", f"expert.path={run['expert']}", *overrides])


class FakeHfApi:
    """Records what export asks of the Hub; whoami accepts the token, unless told otherwise."""

    calls: list = []
    fail_upload = False

    def __init__(self, token=None, endpoint=None):
        self.token, self.endpoint = token, endpoint or "https://huggingface.co"

    def whoami(self, token=None):
        FakeHfApi.calls.append(("whoami", token))
        return {"name": "someone"}

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        files = sorted(p.name for p in __import__("pathlib").Path(kwargs["folder_path"]).iterdir())
        FakeHfApi.calls.append(("upload_folder", kwargs, files))
        if FakeHfApi.fail_upload:
            raise RuntimeError("503 Service Unavailable\nretry later")


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(FakeHfApi, "calls", [])
    monkeypatch.setattr(FakeHfApi, "fail_upload", False)
    return FakeHfApi


@pytest.fixture
def no_merge(monkeypatch):
    """Fails the test if export starts merging."""
    merges = []
    monkeypatch.setattr(export_stage, "_merge", lambda *args: merges.append(args) or pytest.fail("merge started"))
    return merges


# ---- the model card -------------------------------------------------------------------------


def test_export_writes_a_model_card_that_parses_back_with_the_runs_records(run):
    from huggingface_hub import ModelCard

    model_files = {p.name: p.read_bytes() for p in (run["dir"] / "model").iterdir()}
    fingerprint = weights_fingerprint(str(run["dir"] / "model"))
    run_export(export_config(run))
    merged = run["dir"] / "merged"
    card = ModelCard.load(merged / "README.md")
    data = card.data
    assert data.base_model == EXPERT_ID and data.base_model_relation == "finetune"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert {"lightreasoner", "lora"} <= set(data.tags) and "peft" not in data.tags
    assert data.amateur_model == AMATEUR_ID and data.datasets == ["openai/gsm8k"]
    # The model-index holds the exported model's results (the lightreasoner tag, whose path is the adapter),
    # in %, not the baseline's.
    expected = {(name, "accuracy"): round(100 * scores["accuracy"], 2)
                for name, scores in RESULTS["models"]["lightreasoner"]["benchmarks"].items()}
    got = {(r.dataset_type, r.metric_type): r.metric_value for r in data.eval_results}
    assert got == expected and got[("gsm8k", "accuracy")] == 70.58
    assert {r.dataset_name for r in data.eval_results} == {"GSM8K", "MATH-500", "SVAMP"}
    text = card.text
    for needle in ("| β (KL threshold for a step) | 0.4 |", "| α (plausibility mask) | 0.2 |",
                   "| tuned tokens (selected steps trained on) | 12345 |", "| learning rate | 5e-05 |",
                   "| LoRA r / alpha / dropout | 8/16/0.05 |", f"`{AMATEUR_ID}`", "| expert | 42.5 | 34.2 | 50.0 |",
                   "| this model | 70.6 | 59.3 | 78.1 |"):
        assert needle in text, needle
    # The card goes beside the merged model, never into model/: its files identify the trained weights.
    assert {p.name: p.read_bytes() for p in (run["dir"] / "model").iterdir()} == model_files
    assert weights_fingerprint(str(run["dir"] / "model")) == fingerprint
    assert json.loads((merged / EXPORT_MARK).read_text())["merged"] is True


def test_export_without_merge_copies_the_adapter_with_its_card(run, tiny_pair, tmp_path, no_merge):
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output = tmp_path / "adapter"
    result = run_export(export_config(run, "export.merge=false", f"export.output={output}"))
    assert result["merged"] is False and result["parameters"] is None and no_merge == []
    data = ModelCard.load(output / "README.md").data
    assert data.library_name == "peft" and data.base_model == EXPERT_ID and data.base_model_relation == "adapter"
    assert "peft" in data.tags and len(data.eval_results) == 3
    assert json.loads((output / "adapter_config.json").read_text())["base_model_name_or_path"] == EXPERT_ID
    assert (output / "tokenizer_config.json").is_file() and not (output / "provenance.json").exists()
    assert not (output / "model.safetensors").exists()
    # The copy is the same adapter: PEFT's outputs on the expert equal the original adapter's.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_pair["expert"]), str(output)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=torch.tensor(LORA_CHECK_IDS)).logits, run["adapted_logits"])


def test_a_card_leaves_out_what_the_run_did_not_record(lora_adapter, tiny_pair, tmp_path):
    """An adapter outside any run: no settings, no model-index; a local expert is no Hub id (no base_model)."""
    from huggingface_hub import ModelCard

    adapter = tmp_path / "lonely" / "model"
    shutil.copytree(lora_adapter["dir"], adapter)
    output = tmp_path / "out"
    run_export(load_config(None, [f"export.adapter={adapter}", f"export.output={output}"]))
    card = ModelCard.load(output / "README.md")
    assert card.data.base_model is None and card.data.eval_results is None
    assert "## Evaluation" not in card.text and f"`{tiny_pair['expert']}`" in card.text


def test_hub_ids_of_paths():
    assert hub.hub_id("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert hub.hub_id("/cache/hub/models--deepseek-ai--DeepSeek-R1-Distill-Qwen-1.5B/snapshots/ab12") == \
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert hub.hub_id("/data/models/expert") is None and hub.hub_id("s3://bucket/model") is None
    assert hub.hub_id("/cache/datasets--openai--gsm8k/snapshots/x", "datasets") == "openai/gsm8k"


# ---- pushing ---------------------------------------------------------------------------------


def test_an_offline_push_fails_in_one_line_before_any_merge_work(run, tmp_path, monkeypatch, capsys, no_merge):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    output = tmp_path / "never"
    with pytest.raises(LightReasonerError) as caught:
        run_export(export_config(run, f"export.output={output}", "export.push_to_hub=someone/lr-model"))
    message = str(caught.value)
    assert "\n" not in message and "export.push_to_hub=someone/lr-model" in message and "HF_HUB_OFFLINE" in message
    assert not output.exists() and no_merge == []
    # The command line's flag: exit 2, one line on stderr, nothing written.
    code = cli.main(["export", f"output_dir={run['dir']}", f"expert.path={run['expert']}",
                     f"export.output={output}", "--push-to-hub", "someone/lr-model"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "switched off" in err[0] and "Traceback" not in err[0]
    assert not output.exists()


def test_a_push_without_a_token_or_a_reachable_hub_is_refused_naming_it(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    assert huggingface_hub.get_token() is None
    with pytest.raises(LightReasonerError, match=r"^export.push_to_hub=a/b: no Hugging Face token; run `hf auth login`"):
        hub.check_push("a/b")
    with pytest.raises(LightReasonerError, match="not a Hub repo id"):
        hub.check_push("not a repo/na me")
    # A real HfApi against a port nothing listens on: the Hub is unreachable.
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(LightReasonerError) as caught:
        hub.check_push("a/b", "dataset")
    assert "is unreachable" in str(caught.value) and "127.0.0.1:9" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_push_creates_the_repo_and_uploads_the_exported_folder(run, tmp_path, fake_hub):
    from huggingface_hub import ModelCard

    output = tmp_path / "pushed"
    result = run_export(export_config(run, f"export.output={output}", "export.push_to_hub=someone/lr-model"))
    assert [call[0] for call in fake_hub.calls] == ["whoami", "create_repo", "upload_folder"]
    assert fake_hub.calls[0] == ("whoami", "hf_test_token")
    _, repo_id, create = fake_hub.calls[1]
    assert repo_id == "someone/lr-model" and create["repo_type"] == "model" and create["exist_ok"] is True
    _, upload, files = fake_hub.calls[2]
    assert upload["repo_id"] == "someone/lr-model" and upload["folder_path"] == str(output)
    assert upload["repo_type"] == "model" and upload["token"] == "hf_test_token"
    assert {"README.md", "model.safetensors", "config.json", "tokenizer_config.json", EXPORT_MARK} <= set(files)
    assert result["url"] == "https://huggingface.co/someone/lr-model"
    assert ModelCard.load(output / "README.md").data.model_name == "someone/lr-model"


def test_a_failed_upload_keeps_the_export_and_says_how_to_upload_it(run, tmp_path, fake_hub):
    fake_hub.fail_upload = True
    output = tmp_path / "kept"
    with pytest.raises(LightReasonerError) as caught:
        run_export(export_config(run, f"export.output={output}", "export.push_to_hub=someone/lr-model"))
    message = str(caught.value)
    assert "\n" not in message and "503 Service Unavailable" in message
    assert f"is kept: upload it with `hf upload someone/lr-model {output}`" in message
    assert (output / "README.md").is_file() and (output / "model.safetensors").is_file()


# ---- the samples as a dataset ------------------------------------------------------------------


def test_export_samples_writes_a_dataset_card_that_load_dataset_reads(run, tmp_path):
    import datasets
    from huggingface_hub import DatasetCard

    layout = run["layout"]
    summary = hub.export_samples(export_config(run))
    directory = run["dir"] / "samples_dataset"
    assert summary == {"directory": str(directory), "rows": 5, "files": 2}
    card = DatasetCard.load(directory / "README.md")
    assert card.data.configs == [{"config_name": "default", "data_files": [{"split": "train", "path": "*.parquet"}]}]
    assert card.data.expert_model == EXPERT_ID and card.data.amateur_model == AMATEUR_ID
    assert card.data.source_datasets == ["openai/gsm8k"] and card.data.size_categories == ["n<1K"]
    assert "| β (KL threshold for a step) | 0.4 |" in card.text and "| trajectories | 5 |" in card.text
    expected = sorted(SAMPLE_ROWS, key=lambda row: row["problem_id"])
    for loaded in (datasets.load_dataset("parquet", data_dir=str(directory), split="train",
                                         cache_dir=str(tmp_path / "cache1")),
                   datasets.load_dataset(str(directory), split="train", cache_dir=str(tmp_path / "cache2"))):
        rows = sorted(loaded.to_list(), key=lambda row: row["problem_id"])
        assert [row["problem_id"] for row in rows] == [row["problem_id"] for row in expected]
        assert [row["target_probs"] for row in rows] == [row["target_probs"] for row in expected]
        assert [row["target_ids"] for row in rows] == [row["target_ids"] for row in expected]
    # samples/ itself stays a pure Parquet dataset, readable as one.
    assert not (run["dir"] / "samples" / "README.md").exists()
    assert pq.read_table(layout.samples).num_rows == 5
    # A second export replaces the directory whole.
    (directory / "stale.parquet").write_bytes(b"not parquet")
    hub.export_samples(export_config(run))
    assert not (directory / "stale.parquet").exists()


def test_export_samples_pushes_a_dataset_repo_and_refuses_offline(run, monkeypatch, capfd, fake_hub):
    base = ["export-samples", f"output_dir={run['dir']}", "--push-to-hub", "someone/lr-samples"]
    assert cli.main(base) == 0
    assert [call[0] for call in fake_hub.calls] == ["whoami", "create_repo", "upload_folder"]
    assert fake_hub.calls[1][1] == "someone/lr-samples" and fake_hub.calls[1][2]["repo_type"] == "dataset"
    upload, files = fake_hub.calls[2][1], fake_hub.calls[2][2]
    assert upload["repo_type"] == "dataset" and upload["folder_path"] == str(run["dir"] / "samples_dataset")
    assert files == ["README.md", "part-0.parquet", "part-1.parquet"]
    assert "uploaded to https://huggingface.co/datasets/someone/lr-samples" in capfd.readouterr().out

    shutil.rmtree(run["dir"] / "samples_dataset")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(base) == 2
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lightreasoner export-samples: error:")]
    assert len(errors) == 1 and "export.push_to_hub=someone/lr-samples" in errors[0] and "switched off" in errors[0]
    assert "Traceback" not in err
    assert not (run["dir"] / "samples_dataset").exists()


def test_export_samples_without_samples_is_one_line(tmp_path):
    with pytest.raises(LightReasonerError, match=r"no samples in .*samples: run `lightreasoner sample`"):
        hub.export_samples(load_config(None, [f"output_dir={tmp_path}"]))


def test_a_card_names_sampled_rollouts_and_a_loss_other_than_the_papers():
    from lightreasoner_ray.stages.hub import RunRecords, dataset_card, model_card

    paper = RunRecords(sampling={"beta": 0.4, "temperature": 0.0} | {"alpha": 0.2},
                       training={"train_config": {"divergence": "forward_kl", "anchor_weight": 0.0}})
    text = str(model_card(base="/models/expert", adapter="/run/model", output="/run/merged", merged=True,
                          records=paper, adapter_config={}, model_name="me/model"))
    assert "own greedy solutions" in text and "| rollouts | greedy |" in text and "| loss |" not in text

    sampled = RunRecords(sampling={"beta": 0.4, "temperature": 0.6, "top_p": 0.95, "seed": 3},
                         training={"train_config": {"divergence": "jsd", "jsd_beta": 0.3, "anchor_weight": 0.1}})
    text = str(model_card(base="/models/expert", adapter="/run/model", output="/run/merged", merged=True,
                          records=sampled, adapter_config={}, model_name="me/model"))
    assert "own sampled solutions" in text
    assert "| rollouts | sampled: temperature 0.6, top-p 0.95, seed 3 |" in text
    assert "| loss | generalised JSD (β 0.3) + 0.1 × KL(expert ‖ model) |" in text
    assert "the expert's sampled solution" in str(dataset_card(sampled, rows=5))


def test_a_read_only_token_is_refused_before_any_work(fake_hub, monkeypatch):
    monkeypatch.setattr(fake_hub, "whoami", lambda self, token=None: {"name": "me", "auth": {
        "type": "access_token", "accessToken": {"role": "read"}}})
    with pytest.raises(LightReasonerError, match="token is read-only; use a token with write access"):
        hub.check_push("me/model")
    monkeypatch.setattr(fake_hub, "whoami", lambda self, token=None: {"name": "me", "auth": {
        "type": "access_token", "accessToken": {"role": "write"}}})
    assert hub.check_push("me/model").repo_id == "me/model"
