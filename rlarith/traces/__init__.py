"""Per-step traces: every prompt, completion, reward and advantage of every step, on every rank.

Why: when a run does not learn, the traces are the only record of what the model saw and said. They are
written on the fly, compressed, crash-safe and resume-aware, and read back as pandas frames.

Layout (docs/traces.md is the reference, with a decode recipe needing only h5py+zstd)::

    traces/
      rank0000.<attempt>.steps00000000-00000499.c00000000.h5   sealed shard: one rank, one attempt, many steps
      pending/rank0000.<attempt>.00000500.journal              the steps since the last shard, append-only
      .staging/                                                shards being written; never read

One file per concept: ``format`` (the on-disk layout), ``writer`` (``TraceWriter``, the trainer's side),
``reader`` (``open`` and ``Traces``), ``report`` (summary, per-step table, export, plot).
"""

from rlarith.traces.format import FORMAT, KNOWN_KINDS, META_COLUMNS, VERSION, TraceError
from rlarith.traces.reader import Traces, open, run_trace_dir
from rlarith.traces.report import export, format_summary, plot
from rlarith.traces.writer import TraceWriter

__all__ = [
    "FORMAT",
    "KNOWN_KINDS",
    "META_COLUMNS",
    "VERSION",
    "TraceError",
    "TraceWriter",
    "Traces",
    "export",
    "format_summary",
    "open",
    "plot",
    "run_trace_dir",
]
