"""GLUE metrics as an ``evaluate`` module that works offline (load it by path).

``evaluate.load("glue", ...)`` downloads its script from the Hub; this module computes the same
numbers locally with scikit-learn and SciPy::

    import evaluate
    from hf_fedlora.metrics import GLUE_METRIC_PATH

    metric = evaluate.load(GLUE_METRIC_PATH, config_name="mrpc")
    metric.compute(predictions=[1, 0, 1], references=[1, 1, 1])
    # {'accuracy': 0.667, 'f1': 0.8}

Config names are the GLUE tasks (``sst2``, ``cola``, ``mrpc``, ``qqp``, ``stsb``, ``mnli``,
``mnli_matched``, ``mnli_mismatched``, ``qnli``, ``rte``, ``wnli``, ``hans``) plus ``multiclass``
(accuracy and macro F1, for any other text classification such as AG News).
"""

from __future__ import annotations

import datasets
import evaluate
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={ICLR},
  year={2019}
}
"""

_DESCRIPTION = """\
GLUE metrics computed offline: accuracy (sst2, mnli*, qnli, rte, wnli, hans), accuracy and F1
(mrpc, qqp), Matthews correlation (cola), Pearson and Spearman correlation (stsb), and accuracy
with macro F1 (multiclass).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted labels (int), or scores (float) for stsb.
    references: gold labels (int), or scores (float) for stsb.
Returns:
    accuracy (sst2, mnli, mnli_matched, mnli_mismatched, qnli, rte, wnli, hans, mrpc, qqp, multiclass),
    f1 (mrpc, qqp: binary F1 of class 1; multiclass: macro F1),
    matthews_correlation (cola), pearson and spearmanr (stsb).
Examples:
    >>> metric = evaluate.load("path/to/glue.py", config_name="mrpc")
    >>> metric.compute(predictions=[1, 0, 1], references=[1, 1, 1])
    {'accuracy': 0.6666666666666666, 'f1': 0.8}
"""

ACCURACY_TASKS = ("sst2", "mnli", "mnli_mismatched", "mnli_matched", "qnli", "rte", "wnli", "hans")
CONFIG_NAMES = ACCURACY_TASKS + ("cola", "stsb", "mrpc", "qqp", "multiclass")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Glue(evaluate.Metric):
    """The GLUE metric of one task (``config_name``)."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in CONFIG_NAMES:
            raise KeyError(
                f"unknown GLUE metric config {self.config_name!r}; choose one of {list(CONFIG_NAMES)}."
            )
        dtype = "float32" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}
            ),
            format="numpy",
        )

    def _compute(self, predictions, references):
        name = self.config_name
        if name == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        if name == "stsb":
            return {
                "pearson": float(pearsonr(predictions, references)[0]),
                "spearmanr": float(spearmanr(predictions, references)[0]),
            }
        accuracy = float(accuracy_score(references, predictions))
        if name in ("mrpc", "qqp"):
            return {"accuracy": accuracy, "f1": float(f1_score(references, predictions))}
        if name == "multiclass":
            return {"accuracy": accuracy, "f1": float(f1_score(references, predictions, average="macro"))}
        return {"accuracy": accuracy}
