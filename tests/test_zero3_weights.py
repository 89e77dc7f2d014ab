"""ZeRO-3 loading and saving slice by slice (stages/training/zero3_weights.py), on 2 gloo ranks.

Each test spawns two DeepSpeed ranks (torch.multiprocessing, gloo on CPU) that build the
expert through the worker's own ``build_causal_lm`` and save it through the checkpoint's
own ``save_hf_model``. Tiny Qwen2 models are shaped to catch slicing mistakes: a vocabulary
and hidden size that are odd (every partition boundary falls inside a row, the last
partition is padded), tied and untied embeddings.

Oracles are independent of the code under test: the safetensors file read with
``safetensors`` (bit for bit), the same training run under ZeRO-2 (which never
partitions parameters), and what ``AutoModelForCausalLM.from_pretrained`` reads back.
Memory is counted in elements, not resident memory (robust on a shared machine): a
``TorchDispatchMode`` records the largest tensor any operation reads or makes, and a
hook inside the save counts the parameters gathered at each point.
"""

from __future__ import annotations

import gc
import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch

try:
    from test_training import sampled  # noqa: F401 (the samples fixture)
except ImportError:
    pass

WORLD = 2
STEPS = 3


def _tokenizer_and_model(directory: Path, tied: bool) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lightreasoner_ray.toy.tiny_models import train_tokenizer

    tokenizer = train_tokenizer(["one plus two is three", "four minus one is three"], vocab_size=300)
    vocab = len(tokenizer) | 1  # odd
    config = Qwen2Config(vocab_size=vocab, hidden_size=63, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=127, tie_word_embeddings=tied,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(3)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)  # norms too: every element differs from its neighbours
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("odd_models")
    paths = {}
    for name, tied in (("tied", True), ("untied", False)):
        _tokenizer_and_model(root / name, tied)
        paths[name] = root / name
    return paths


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _file_mapped(address: int) -> bool:
    """Whether ``address`` lies in a mapping of a file (not anonymous memory), per /proc/self/maps."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        low, high = (int(bound, 16) for bound in fields[0].split("-"))
        if low <= address < high:
            return len(fields) > 5 and fields[5].startswith("/") and fields[4] != "0"
    return False


class _LargestTensor:
    """A dispatch mode recording the largest tensor storage (in elements of 4 bytes, the models' fp32) that an
    operation reads or produces, leaving out storages mapped from a file (safetensors memory-maps the
    weight files: a slice of one is a view whose pages are read only where it is copied from) and the
    storages in ``held`` (the rank's own partitions, which DeepSpeed keeps in one flat buffer)."""

    def __init__(self, held: frozenset = frozenset()):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self
        self.largest = 0
        self.where = ""

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                result = func(*args, **(kwargs or {}))
                for value in torch.utils._pytree.tree_leaves((args, kwargs, result)):
                    if not isinstance(value, torch.Tensor):
                        continue
                    storage = value.untyped_storage()
                    elements = storage.nbytes() // 4
                    if (elements > outer.largest and storage.data_ptr() not in held
                            and not _file_mapped(storage.data_ptr())):
                        outer.largest, outer.where = elements, f"{func} {tuple(value.shape)}"
                return result

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def _rank(rank: int, port: int, expert: str, out: str, lora: bool, threshold: int, fallback: bool) -> None:
    """One rank: build under ZeRO-3 (probed), compare with the file, train, save (probed); then the same under ZeRO-2."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from safetensors import safe_open

    from lightreasoner_ray.config import load_config
    from lightreasoner_ray.stages.training import checkpoints, worker, zero3_weights
    from lightreasoner_ray.stages.training.deepspeed_config import deepspeed_config

    deepspeed.init_distributed(dist_backend="gloo")
    if fallback:
        worker.weight_files = lambda directory: None  # as for a model without safetensors weights
    report: dict = {}
    for stage in (3, 2):
        config = load_config(None, [
            f"expert.path={expert}", f"train.deepspeed.stage={stage}", f"train.num_workers={WORLD}",
            f"train.lora.enabled={str(lora).lower()}", "train.lora.dropout=0.0", f"output_dir={out}/run{stage}",
            "train.steps_per_update=2", "train.micro_batch_steps=1", "train.lr=0.01",
            "train.lora.target_modules=[q_proj,v_proj,down_proj]",
        ])
        ds_config = deepspeed_config(config.train, False, on_gpu=False, world_size=WORLD)
        if stage == 3:
            ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = threshold
        original_load = worker.load_partitions
        probes: dict = {}

        def probed_load(*args, **kwargs):
            with _LargestTensor() as probes["load"]:
                return original_load(*args, **kwargs)

        worker.load_partitions = probed_load
        with _LargestTensor() as built:
            loaded = worker.build_causal_lm(config, ds_config, False)
        worker.load_partitions = original_load
        model = loaded.causal_lm
        base = model.get_base_model() if lora else model
        if stage == 3:
            # Every gathered parameter equals the file, bit for bit.
            with safe_open(str(Path(expert, "model.safetensors")), framework="pt") as handle:
                keys = set(handle.keys())
                mismatched = []
                for name, param in base.named_parameters():
                    if not hasattr(param, "ds_tensor"):
                        continue  # a LoRA parameter, made after loading
                    name = name.replace(".base_layer", "")
                    with deepspeed.zero.GatheredParameters([param]):
                        if name not in keys or not torch.equal(param.data, handle.get_tensor(name)):
                            mismatched.append(name)
            params = [p for p in base.parameters() if hasattr(p, "ds_tensor")]
            rows = max((p.ds_tensor.ds_numel + 2 * (math.prod(p.ds_shape[1:]) if len(p.ds_shape) > 1 else 1))
                       for p in params)
            report.update(mismatched=mismatched, largest_while_building=built.largest, building_where=built.where,
                          largest_while_loading=probes["load"].largest if "load" in probes else None,
                          loading_where=probes["load"].where if "load" in probes else None, partition_bound=rows,
                          largest_parameter=max(p.ds_numel for p in params),
                          largest_gathered=max(p.ds_tensor.ds_numel * WORLD for p in params), held=loaded.parameters_held,
                          total=loaded.parameters,
                          tied=base.lm_head.weight is base.model.embed_tokens.weight)
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
        engine.train()
        vocab = base.config.vocab_size
        for step in range(STEPS):
            generator = torch.Generator().manual_seed(100 * step + rank)
            ids = torch.randint(0, vocab, (2, 9), generator=generator)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
        if stage == 3:
            gathered_counts: list[int] = []

            def on_gathered(name, param):
                gathered_counts.append(sum(p.ds_numel for p in base.parameters()
                                           if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_persist))

            original = zero3_weights.save_model_shards

            def probed(*args, **kwargs):
                return original(*args, **{**kwargs, "on_gathered": on_gathered})

            checkpoints.save_model_shards = probed
            partitions = frozenset(p.ds_tensor.untyped_storage().data_ptr() for p in base.parameters())
            with _LargestTensor(partitions) as saving:
                checkpoints.save_hf_model(engine, model, config, f"{out}/z3", rank)
            checkpoints.save_model_shards = original
            report.update(largest_while_saving=saving.largest, saving_where=saving.where, gathered_counts=gathered_counts,
                          persistent=sum(p.ds_numel for p in base.parameters() if p.ds_persist))
        else:
            checkpoints.save_hf_model(engine, model, config, f"{out}/z2", rank)
        del engine, model, base, loaded
        gc.collect()
        from transformers.integrations import is_deepspeed_zero3_enabled

        assert not is_deepspeed_zero3_enabled()  # the ZeRO-2 run below builds a plain model
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))


def _spawn(expert: Path, out: Path, lora: bool, threshold: int, fallback: bool = False) -> list[dict]:
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(_free_port(), str(expert), str(out), lora, threshold, fallback), nprocs=WORLD)
    return [json.loads(Path(out, f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def _saved(directory: Path, expert: Path, lora: bool) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    if lora:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(expert), str(directory))
    else:
        model = AutoModelForCausalLM.from_pretrained(directory)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("variant,lora,threshold", [
    ("tied", False, 0), ("untied", False, 100_000), ("tied", True, 100_000), ("untied", True, 0),
], ids=["tied-full", "untied-full-persistent", "tied-lora-persistent", "untied-lora"])
def test_zero3_loads_slices_exactly_trains_as_zero2_and_never_holds_the_model(odd_models, tmp_path, variant, lora,
                                                                               threshold):
    """Loaded partitions gather back to the file bit for bit; after the same 3 updates the model saved
    under ZeRO-3 (shard by shard, or the adapter alone) equals the one saved under ZeRO-2; and no rank
    materialises more than a partition plus two rows while loading, or more than one gathered
    parameter while saving. ``threshold`` 100000 makes every parameter of this tiny model persistent
    (DeepSpeed then keeps them gathered after initialisation), 0 none."""
    expert = odd_models[variant]
    reports = _spawn(expert, tmp_path, lora, threshold)
    for rank, report in enumerate(reports):
        assert report["mismatched"] == [], (rank, report["mismatched"])
        assert report["tied"] is (variant == "tied")
        assert report["held"] <= report["total"] // WORLD + 64, report  # each rank keeps about half
        # Building: zero.Init makes one parameter at a time (empty) and keeps its partition.
        assert report["largest_while_building"] <= report["largest_parameter"], report
        # Loading: nothing larger than one partition plus the rows it falls in (the largest
        # parameter, gathered or read whole, would be more).
        assert report["largest_while_loading"] <= report["partition_bound"] < report["largest_parameter"], report
        # Saving: one parameter gathered at a time (padded to a multiple of the ranks), nothing larger.
        assert report["largest_while_saving"] <= report["largest_gathered"] < 2 * report["largest_parameter"], report
        counts = report["gathered_counts"]
        if lora:
            # The base is never gathered for an adapter: nothing near the embedding's size is touched.
            assert counts == [] and report["largest_while_saving"] < report["largest_parameter"] // 4, report
        else:
            assert len(counts) > 0 and max(counts) <= report["largest_parameter"], counts
            if threshold == 0:
                assert report["persistent"] == 0 and min(counts) > 0, report

    z3, z2 = _saved(tmp_path / "z3", expert, lora), _saved(tmp_path / "z2", expert, lora)
    original = _saved(expert, expert, False)
    assert z3.keys() == z2.keys()
    for key in z3:
        # Adam's step amplifies fp32 rounding where a gradient is near zero (m / sqrt(v) of tiny
        # values): an element may differ by a small fraction of one step (lr 0.01), never by a step.
        torch.testing.assert_close(z3[key], z2[key], rtol=0, atol=2e-4, msg=key)
        if key in original:
            moved = (z2[key] - original[key]).abs().mean()
            assert (z3[key] - z2[key]).abs().mean() <= 1e-3 * moved + 1e-7, key
    if lora:  # the adapter's B matrices start at zero
        changed = [key for key in z3 if "lora_B" in key and bool(z3[key].abs().max() > 0)]
    else:
        changed = [key for key in original if key in z3 and not torch.equal(z3[key], original[key])]
    assert changed, "training changed nothing: the comparison would be vacuous"
    if not lora:
        assert not (tmp_path / "z3" / "pytorch_model.bin").exists()
        assert (tmp_path / "z3" / "tokenizer_config.json").is_file()


@pytest.mark.slow
def test_the_probe_sees_transformers_reading_whole_tensors(odd_models, tmp_path):
    """Negative control for the memory bound above: when the weights cannot be loaded slice by slice
    (here: as if the model had no safetensors files), transformers' loader is used and it does
    materialise whole tensors on every rank; the loaded model is still right."""
    reports = _spawn(odd_models["untied"], tmp_path, False, 0, fallback=True)
    for report in reports:
        assert report["mismatched"] == []
        assert report["largest_while_loading"] is None  # load_partitions was not used
        assert report["largest_while_building"] > report["partition_bound"], report


def test_streamed_safetensors_shards_read_back_with_safetensors(tmp_path):
    """save_model_shards writes headers from the shapes and streams the bytes: without DeepSpeed (plain
    tensors, one rank) the files must read back exactly, in several shards with an index, tied once."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from lightreasoner_ray.stages.training.zero3_weights import save_model_shards

    config = Qwen2Config(vocab_size=101, hidden_size=63, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=127, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    save_model_shards(model, str(tmp_path / "out"), rank=0, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert "lm_head.weight" not in index["weight_map"]  # tied: written once, as save_pretrained does
    for name, param in model.named_parameters():
        with safe_open(str(tmp_path / "out" / index["weight_map"][name]), framework="pt") as handle:
            assert torch.equal(handle.get_tensor(name), param.detach()), name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.dtype == torch.bfloat16
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name


@pytest.mark.slow
def test_zero3_full_finetuning_checkpoints_resume_and_resave_the_sharded_model(tiny_pair, sampled, ray_local,
                                                                               tmp_path):
    """Full fine-tuning under ZeRO-3 through Ray Train: the final checkpoint's model (saved shard by shard)
    is covered by every worker's completion marker and loads with ``from_pretrained``; a re-run that finds
    only that checkpoint, unregistered, restores it and saves the model again (``-final``), identical."""
    import shutil

    from transformers import AutoModelForCausalLM

    from lightreasoner_ray.io.layout import RunLayout
    from lightreasoner_ray.stages.training.checkpoints import checkpoint_problem
    from lightreasoner_ray.stages.training.driver import run_training
    from test_training import load_base, train_config

    def config(output_dir):
        return train_config(tiny_pair, output_dir, sampled["dir"], "train.deepspeed.stage=3",
                            "train.lora.enabled=false", "train.max_steps=4", "train.checkpoint_every=2",
                            "train.lr=0.003", "train.max_failures=0")

    first = tmp_path / "first"
    summary = run_training(config(first))
    assert summary["model_kind"] == "hf_model" and summary["parameters_loaded_per_rank"] <= summary["parameters"] * 0.55
    final = first / "checkpoints" / "train" / "step_0000004"
    marker = json.loads((final / "complete_rank0.json").read_text())
    assert "hf_model/model.safetensors" in marker["files"]
    assert checkpoint_problem(str(final), 0) is None and checkpoint_problem(str(final), 1) is None
    trained = AutoModelForCausalLM.from_pretrained(first / "model").state_dict()
    base = load_base(tiny_pair).state_dict()
    assert trained.keys() == base.keys() and any(not torch.equal(trained[k], base[k]) for k in base)

    second = tmp_path / "second"
    shutil.copytree(final, second / "checkpoints" / "train" / "step_0000004")
    shutil.copy(RunLayout(str(first)).checkpoints_provenance, RunLayout(str(second)).checkpoints_provenance)
    summary = run_training(config(second))
    assert summary["resumed_from_step"] == 4
    assert (second / "checkpoints" / "train" / "step_0000004-final").is_dir()
    again = AutoModelForCausalLM.from_pretrained(second / "model").state_dict()
    for key in trained:
        assert torch.equal(again[key], trained[key]), key
