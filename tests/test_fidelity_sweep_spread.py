"""bench/fidelity_sweep.py --spread: mean ± s.d. over seeds from hand-made result files."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "fidelity_sweep.py"


def sweep_module():
    spec = importlib.util.spec_from_file_location("fidelity_sweep", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scores(accuracy, best, auc):
    return {"accuracy": accuracy, "best_threshold_accuracy": best, "auc": auc}


def variant(accuracy, auc, ranking=None):
    probe = {"ranking": {"cosine": ranking}} if ranking is not None else {}
    return {"scores": scores(accuracy, 0.82, auc), "fidelity_initial": probe,
            "fidelity_trained": probe}


def test_spread_pools_seeds_and_lets_a_ranking_rerun_stand_for_its_variant(tmp_path):
    files = {
        # seed 0 (no seed in args: an older file), X_ranking standing for X
        "a.json": {"args": {}, "zero_shot": scores(0.795, 0.82, 0.883),
                   "best": variant(0.70, 0.10), "best_ranking": variant(0.80, 0.88, 0.3)},
        "b.json": {"args": {"seed": 1}, "zero_shot": scores(0.795, 0.82, 0.883),
                   "best": variant(0.84, 0.90, 0.5), "only_seed1": variant(0.5, 0.5)},
    }
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    table = sweep_module().spread_table([str(tmp_path / n) for n in files])
    # By hand: mean of 0.80 and 0.84 is 82.0, s.d. sqrt(2 * 0.02^2) = 0.028 -> 2.8 points;
    # AUC 0.88 and 0.90: 0.890 ± 0.014; ranking cosines 0.3 and 0.5: 0.40 ± 0.14.
    assert "| best | 0.40 ± 0.14 | 0.40 ± 0.14 | 82.0 ± 2.8 | 82.0 ± 0.0 | 0.890 ± 0.014 |" in table
    assert "| zero_shot |  |  | 79.5 ± 0.0 | 82.0 ± 0.0 | 0.883 ± 0.000 |" in table
    assert "only_seed1" not in table and "2 seeds: 0, 1" in table
