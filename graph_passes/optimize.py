"""The exact graph optimizations every export applies after the ITAE pass, in order:

1. k_transpose.py: k^T as one Transpose of k, the attention scale on q (non-final blocks);
2. output_rows.py: the final block's token-wise tail on the row the output reads.

Each is skipped when the graph's metadata says it was applied already (an ONNX the export wrote),
so running this twice changes nothing. A pass that finds nothing to do, or refuses the graph, is
left out with its reason in `notes`. Pure onnx; weights are never read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from .k_transpose import canonical_k_transpose
from .metadata import metadata_field
from .output_rows import OutputRowsError, is_pruned, prune_output_rows


@dataclass
class OptimizeResult:
    records: dict[str, dict] = field(default_factory=dict)  # pass -> its record (to_dict, or the metadata's)
    changed: bool = False  # the returned graph differs from the input
    notes: list[str] = field(default_factory=list)  # passes left out, and why
    lines: list[str] = field(default_factory=list)  # the applied passes' summaries

    def summary(self) -> str:
        return "\n".join(self.lines + self.notes) or "nothing to do"


def optimize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, OptimizeResult]:
    """`model` with the optimizations applied (a copy when any applies) and what was done."""
    res = OptimizeResult()
    done = metadata_field(model, "k_transpose")
    if isinstance(done, dict):
        res.records["k_transpose"] = done
        res.notes.append("k_transpose: applied before (metadata)")
    else:
        new, kt = canonical_k_transpose(model)
        if kt.num_rewritten:
            model, res.changed = new, True
            res.records["k_transpose"] = kt.to_dict()
            res.lines.append(kt.summary().splitlines()[0])
        else:
            res.notes.append("k_transpose not applied: " + ("; ".join(f"{n}: {r}" for n, r in kt.rejected)
                                                           or "no attention block to rewrite"))
    if is_pruned(model):
        rec = metadata_field(model, "output_rows")
        res.records["output_rows"] = rec if isinstance(rec, dict) else {"pruned": True}
        res.notes.append("output_rows: applied before")
    else:
        try:
            model, rows = prune_output_rows(model)
            res.changed = True
            res.records["output_rows"] = rows.to_dict()
            res.lines.append(rows.summary())
        except OutputRowsError as e:
            res.notes.append(f"output_rows not applied: {e}")
    return model, res
