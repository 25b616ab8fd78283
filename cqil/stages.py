"""The pipeline's stages as one table: name -> (settings class, run function).

Each stage lives in its module as a settings dataclass that *is* the config section of the same name,
the computation, and one `run_<stage>(settings, *, files...)` that reads its inputs and writes its
artifacts with provenance. `cqil <stage>` (cli.py) builds its options from the run function's keyword
arguments, and every Snakemake rule calls it the same way: `cqil <stage> --settings <section as JSON>
--<file> ...`. `check_config` builds every section's settings before any job runs, so a key the
dataclass does not know fails there, not in a job.
"""

from __future__ import annotations

import json
from dataclasses import fields

from .analysis import SensitivitySettings, SimilaritySettings, run_sensitivity, run_similarity
from .baselines import BaselinesSettings, run_baselines, run_comparison
from .claims import run_claims
from .data import CorpusSettings, run_corpus
from .errors import CqilError
from .evaluate import EvaluateSettings, run_evaluate
from .finetune import FinetuneSettings, run_finetune, run_finetuned_table
from .latency.engine import run_latency
from .latency.gpu import run_decode_latency, run_layer_latency
from .latency.settings import LatencySettings
from .latency.table import run_latency_table
from .models import run_prepare
from .quality import QualitySettings, run_compare, run_quality
from .report import run_figures
from .search import ScoreSettings, SearchSettings, SelectSettings, run_score, run_scores_table, run_search, run_select
from .simulate.predict import SimulateSettings, run_simulate
from .tables import run_tables
from .tracking.settings import TrackSettings
from .tracking.track import run_track

STAGES = {  # in pipeline order; a settings class reads the config section named like its stage
    "prepare": (None, run_prepare),
    "corpus": (CorpusSettings, run_corpus),
    "similarity": (SimilaritySettings, run_similarity),
    "sensitivity": (SensitivitySettings, run_sensitivity),
    "search": (SearchSettings, run_search),
    "select": (SelectSettings, run_select),
    "score": (ScoreSettings, run_score),
    "scores-table": (None, run_scores_table),
    "baselines": (BaselinesSettings, run_baselines),
    "finetune": (FinetuneSettings, run_finetune),
    "finetuned-table": (None, run_finetuned_table),
    "evaluate": (EvaluateSettings, run_evaluate),
    "quality": (QualitySettings, run_quality),
    "compare": (None, run_compare),
    "comparison": (None, run_comparison),
    "claims": (None, run_claims),
    "figures": (None, run_figures),
    "latency": (LatencySettings, run_latency),
    "latency-table": (None, run_latency_table),
    "layer-latency": (None, run_layer_latency),
    "decode-latency": (None, run_decode_latency),
    "simulate": (SimulateSettings, run_simulate),
    "tables": (None, run_tables),
    "track": (TrackSettings, run_track),
}
SECTIONS = {name: settings for name, (settings, _) in STAGES.items() if settings}  # config section -> settings class


def settings(cls, values: dict | str, section: str):
    """A stage's settings from its config section (a dict, or JSON text); a one-line error naming the field."""
    if isinstance(values, str):
        try:
            values = json.loads(values or "{}")
        except json.JSONDecodeError as err:
            raise CqilError(f"--settings: not valid JSON ({err})") from None
    known = [f.name for f in fields(cls)]
    if unknown := [key for key in values if key not in known]:
        raise CqilError(f"{section}.{unknown[0]}: not a setting of this stage (allowed: {', '.join(known)})")
    return cls(**values)
