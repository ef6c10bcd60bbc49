"""The offline GLUE metric module, loaded by path through ``evaluate.load``."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import matthews_corrcoef

from hf_fedlora.metrics import GLUE_METRIC_PATH, load_glue_metric


def test_module_is_shipped_as_a_file_and_loads_by_path():
    import evaluate

    metric = evaluate.load(GLUE_METRIC_PATH, config_name="sst2", keep_in_memory=True)
    assert metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0]) == {"accuracy": 0.75}


def test_mrpc_accuracy_and_f1_by_hand():
    # predictions 1,0,1 vs references 1,1,1: precision 1, recall 2/3 -> F1 0.8
    result = load_glue_metric("mrpc", keep_in_memory=True).compute(
        predictions=[1, 0, 1], references=[1, 1, 1]
    )
    assert result == pytest.approx({"accuracy": 2 / 3, "f1": 0.8})


def test_cola_matthews_and_stsb_correlations_match_reference_implementations():
    rng = np.random.default_rng(0)
    pred, ref = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    cola = load_glue_metric("cola", keep_in_memory=True).compute(predictions=pred, references=ref)
    assert cola["matthews_correlation"] == pytest.approx(matthews_corrcoef(ref, pred))
    scores, gold = rng.random(40) * 5, rng.random(40) * 5
    stsb = load_glue_metric("stsb", keep_in_memory=True).compute(predictions=scores, references=gold)
    assert stsb["pearson"] == pytest.approx(pearsonr(scores, gold)[0], abs=1e-6)
    assert stsb["spearmanr"] == pytest.approx(spearmanr(scores, gold)[0], abs=1e-6)


def test_multiclass_reports_accuracy_and_macro_f1():
    result = load_glue_metric("multiclass", keep_in_memory=True).compute(
        predictions=[0, 1, 2, 3], references=[0, 1, 2, 2]
    )
    # class F1s: 1, 1, 2/3, 0 -> macro 2/3
    assert result == pytest.approx({"accuracy": 0.75, "f1": 2 / 3})


def test_unknown_config_lists_the_valid_names():
    with pytest.raises(KeyError, match="sst2"):
        load_glue_metric("sst3", keep_in_memory=True)
