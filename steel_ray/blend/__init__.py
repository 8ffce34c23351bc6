"""The blend optimizer: ensemble weights and per-class post-processing from the OOF pool, honestly
scored (``python -m steel_ray.blend``). One room per concern:

- :mod:`.pool`: reading the pool (every member's OOF maps per class, both resolutions);
- :mod:`.selection`: greedy selection of the members and of the classifier ensemble;
- :mod:`.tune`: :func:`optimize`, post-processing at full resolution and every score;
- :mod:`.document`: blend.json (its schema, writer and one loader) and the console summary;
- :mod:`.holdout`: scoring the holdout, each look recorded;
- :mod:`.report`: the blend selection report (HTML and Markdown);
- :mod:`.cli`: the command line and :func:`blend_run`.
"""
from .cli import blend_run, main, search_models
from .document import SCHEMA_VERSION, BlendDoc, blend_json, load_blend, summary_lines, write_blend_json
from .holdout import record_look, score_holdout
from .pool import BlendPool, load_blend_pool
from .selection import select, select_classifiers
from .tune import BlendResult, ensemble_order, optimize

__all__ = ["BlendPool", "load_blend_pool", "optimize", "BlendResult", "select", "select_classifiers", "write_blend_json",
           "blend_json", "load_blend", "BlendDoc", "SCHEMA_VERSION", "blend_run", "search_models", "summary_lines",
           "score_holdout", "record_look", "ensemble_order", "main"]
