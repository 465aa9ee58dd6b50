"""Adversarial testing (issue 15): attack families, targets (an in-process model or any OpenAI-compatible
endpoint), scorers and reports with Wilson intervals; garak reports read into the same table.

    attacks = build_attacks(requests, ["plain", "base64", "multi_turn"])
    rows = run(ModelTarget(model, tokenizer), attacks, [RefusalScorer(), UnsafeMarkerScorer()])
    write_report("out/", summarize(rows), rows)
"""

from gemma4.redteam.attacks import (DEFAULT_FAMILIES, FAMILIES, Attack, AttackError, Request, build_attacks,
                                    parse_families, read_requests)
from gemma4.redteam.garak import GarakError, find_garak, gcg_suffixes, read_report, summarize_report
from gemma4.redteam.report import ReportError, markdown_table, run, summarize, write_report
from gemma4.redteam.scorers import (ClassifierScorer, MitigationBypassScorer, PrefixesScorer, RefusalScorer,
                                    UnsafeMarkerScorer, garak_lists)
from gemma4.redteam.targets import ModelTarget, OpenAITarget, Target, TargetError

__all__ = [
    "Attack", "AttackError", "Request", "FAMILIES", "DEFAULT_FAMILIES", "build_attacks", "parse_families",
    "read_requests", "Target", "TargetError", "ModelTarget", "OpenAITarget", "RefusalScorer", "UnsafeMarkerScorer",
    "ClassifierScorer", "MitigationBypassScorer", "PrefixesScorer", "garak_lists", "run", "summarize",
    "markdown_table", "write_report", "ReportError", "GarakError", "find_garak", "gcg_suffixes", "read_report",
    "summarize_report",
]
