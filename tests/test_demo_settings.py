"""A demo output_dir holding a run with other settings is refused, not silently resumed."""

import json

import pytest

from lightreasoner_ray.demo import SETTINGS_FILE, claim_output_dir, demo_config
from lightreasoner_ray.errors import LightReasonerError


def test_same_settings_resume_and_seeds_may_be_added(tmp_path):
    claim_output_dir(demo_config([f"output_dir={tmp_path}"]), "pair-a")
    written = json.loads((tmp_path / SETTINGS_FILE).read_text())
    assert written["toy_pair"] == "pair-a" and written["train.lr"] == 2e-4
    claim_output_dir(demo_config([f"output_dir={tmp_path}"]), "pair-a")
    claim_output_dir(demo_config([f"output_dir={tmp_path}", "demo.seeds=[0,7]"]), "pair-a")
    assert json.loads((tmp_path / SETTINGS_FILE).read_text()) == written


@pytest.mark.parametrize("overrides, pair, named", [
    (["train.lr=1e-3"], "pair-a", "train.lr"),
    (["demo.test_problems=50"], "pair-a", "demo.test_problems"),
    ([], "pair-b", "toy_pair"),
])
def test_other_settings_are_refused_naming_what_changed(tmp_path, overrides, pair, named):
    claim_output_dir(demo_config([f"output_dir={tmp_path}"]), "pair-a")
    with pytest.raises(LightReasonerError, match=rf"holds a demo run with other settings \({named} differ"):
        claim_output_dir(demo_config([f"output_dir={tmp_path}", *overrides]), pair)
