"""The evaluation's report: the same tables as aligned plain text or as Markdown, and the run's last line."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .alterations import ALTERATIONS
from .metrics import ALL, CopyDetection, Overlap

Table = tuple[str, list[str], list[list[str]], int]  # heading, header, rows, how many text columns lead


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def _esc(cell: str) -> str:
    return cell.replace("|", "\\|")


def _detection_table(d: CopyDetection) -> Table:
    k = d.k
    heading = (
        f"Copy detection: {len(d.rows)} banners x {len(ALTERATIONS)} alterations, each copy searched among the "
        f"{d.num_items} banners of the index (seed {d.seed}). One relevant item per query (the original): "
        f"AP = 1/rank of the original if it is in the top {k}, else 0, so mAP@{k} = MRR@{k}."
    )
    rows = []
    for s in d.strategies:
        for i, alt in enumerate((ALL, *ALTERATIONS)):
            m = d.metrics(s, alt)
            sims = d.similarity[s]
            cos = np.concatenate([sims[a] for a in ALTERATIONS]) if alt == ALL else sims[alt]
            cells = [_fmt(m.recall_1), _fmt(m.recall_k), _fmt(m.map_k), _fmt(float(cos.mean())), str(m.n)]
            rows.append([s if i == 0 else "", alt, *cells])
    return heading, ["strategy", "alteration", "R@1", f"R@{k}", f"mAP@{k}", "cos", "n"], rows, 2


def _sections(detection: CopyDetection | None, overlap: Overlap | None) -> list[Table]:
    """Each table, for both renderings."""
    out = [_detection_table(detection)] if detection is not None else []
    if overlap is not None:
        k = overlap.k
        capped = f" (capped: the tables hold {k})" if overlap.requested_k > k else ""
        heading = f"Agreement: overlap@{k} of the neighbour tables, mean over rows of |A ∩ B| / {k}{capped}."
        rows = [[a] + [_fmt(v) for v in overlap.matrix[i]] for i, a in enumerate(overlap.strategies)]
        out.append((heading, ["", *overlap.strategies], rows, 1))
    return out


def _notes(detection: CopyDetection | None) -> list[str]:
    if detection is None:
        return []
    notes = ["cos: mean cosine of the altered copy with its original's stored embedding."]
    if detection.requested > detection.num_items:
        notes.append(f"--queries {detection.requested} > {detection.num_items} banners: every banner was used.")
    return notes + [f"skipped appid {appid}: {why}" for appid, why in detection.skipped]


def format_table(detection: CopyDetection | None, overlap: Overlap | None) -> str:
    """The report as aligned plain text: text columns left-aligned, numbers right-aligned."""
    blocks = []
    for heading, header, rows, text in _sections(detection, overlap):
        widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
        lines = [
            "  ".join(v.rjust(widths[c]) if c >= text else v.ljust(widths[c]) for c, v in enumerate(r)).rstrip()
            for r in [header, *rows]
        ]
        blocks.append("\n".join([heading, "", lines[0], "  ".join("-" * w for w in widths), *lines[1:]]))
    notes = _notes(detection)
    return "\n\n".join(blocks + (["\n".join(notes)] if notes else [])) + "\n"


def to_markdown(detection: CopyDetection | None, overlap: Overlap | None) -> str:
    """The same tables as ``format_table``, as GitHub Markdown (numbers right-aligned)."""

    def row(cells: list[str]) -> str:
        return "| " + " | ".join(map(_esc, cells)) + " |"

    blocks = ["# Retrieval evaluation"]
    for heading, header, rows, text in _sections(detection, overlap):
        rule = "| " + " | ".join("---:" if c >= text else "---" for c in range(len(header))) + " |"
        blocks.append(heading + "\n\n" + "\n".join([row(header), rule, *map(row, rows)]))
    notes = _notes(detection)
    if notes:
        blocks.append("\n".join(f"- {_esc(n)}" for n in notes))
    return "\n\n".join(blocks) + "\n"


def summary_line(strategies: Sequence[str], detection: CopyDetection, seconds: float) -> str:
    """The last line of a run: what was measured and how long it took."""
    queries = len(detection.rows)
    strategies_s = f"{len(strategies)} strateg{'y' if len(strategies) == 1 else 'ies'} ({', '.join(strategies)})"
    queries_s = f"{queries} quer{'y' if queries == 1 else 'ies'} x {len(ALTERATIONS)} alterations"
    return f"evaluated {strategies_s} on {queries_s} in {seconds:.1f} s"
