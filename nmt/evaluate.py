"""evaluate.py — corpus BLEU and chrF with sacrebleu (detokenized text, one or more references), with signatures.

Used by `nmt evaluate`, by validation during training and by the recipes' evaluation stages.
"""

from __future__ import annotations

import json
from pathlib import Path

import sacrebleu

from nmt.data import read_lines
from nmt.errors import NMTError


def corpus_scores(hypotheses: list[str], references: list[list[str]]) -> dict:
    """BLEU and chrF of hypotheses against one or more reference streams, each as long as the hypotheses."""
    for i, ref in enumerate(references):
        if len(ref) != len(hypotheses):
            raise NMTError(f"reference {i + 1} has {len(ref)} lines, the hypotheses {len(hypotheses)}")
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    bleu_score = bleu.corpus_score(hypotheses, references)
    chrf_score = chrf.corpus_score(hypotheses, references)
    return {
        "bleu": round(bleu_score.score, 2),
        "chrf": round(chrf_score.score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "bleu_details": str(bleu_score),
        "sentences": len(hypotheses),
    }


def bleu(hypotheses: list[str], references: list[str]) -> float:
    return sacrebleu.metrics.BLEU().corpus_score(hypotheses, [references]).score


def run_evaluate(hyp: str, refs: list[str], as_json: bool = False) -> dict:
    """`nmt evaluate`: score a hypothesis file against reference files; prints a report or JSON."""
    for path in [hyp, *refs]:
        if not Path(path).is_file():
            raise NMTError(f"file not found: {path}")
    result = corpus_scores(read_lines(hyp), [read_lines(r) for r in refs])
    if as_json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print(f"BLEU = {result['bleu']:.2f}  ({result['bleu_signature']})")
        print(f"chrF = {result['chrf']:.2f}  ({result['chrf_signature']})")
        print(result["bleu_details"])
    return result
