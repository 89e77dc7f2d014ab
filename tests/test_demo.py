"""`lightreasoner demo` (the README's main command) runs end to end from an empty cache."""

import json

from lightreasoner_ray.cli import run_command


def test_demo_builds_its_inputs_and_samples(tmp_path, monkeypatch, ray_local):
    monkeypatch.setenv("LIGHTREASONER_CACHE", str(tmp_path / "cache"))
    output_dir = tmp_path / "demo"
    summary = run_command("demo", None, [f"output_dir={output_dir}", "data.limit=6", "sampling.max_new_tokens=12"])
    assert summary["counts"]["problems"] == 6
    assert 0 < summary["counts"]["selected_steps"] <= summary["counts"]["completion_tokens"] <= 6 * 12
    assert json.loads((output_dir / "samples_summary.json").read_text())["counts"] == summary["counts"]
    assert (tmp_path / "cache" / "demo" / "tiny-random-v2" / "expert" / "config.json").is_file()
