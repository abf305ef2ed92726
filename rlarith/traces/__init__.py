"""Per-step traces: every prompt, completion, reward and advantage of every step, on every rank.

Why: when a run does not learn, the traces are the only record of what the model saw and said. They are
written on the fly, compressed, crash-safe and resume-aware, and read back as pandas frames.

Layout (docs/traces.md is the reference, with a decode recipe needing only h5py+zstd)::

    traces/
      rank0000.<attempt>.steps00000000-00000499.c00000000.h5   sealed shard: one rank, one attempt, many steps
      pending/rank0000.<attempt>.00000500.journal              the steps since the last shard, append-only
      .staging/                                                shards being written; never read
      run.json, .lock                                          the run directory it belongs to; its lock

One file per concept: ``format`` (the on-disk layout), ``writer`` (``TraceWriter``, the trainer's side),
``owner`` (which run a trace folder belongs to), ``reader`` (``open`` and ``Traces``: views, summary, steps
missing), ``report`` (the summary as text, export, plot; it imports the reader, never the reverse).
"""

from rlarith.traces.format import FORMAT, KNOWN_KINDS, META_COLUMNS, VERSION, TraceError, TraceStorageError
from rlarith.traces.owner import TraceFolderTaken
from rlarith.traces.reader import Traces, missing_steps, missing_text, open, run_trace_dir, trace_gaps
from rlarith.traces.report import export, format_summary, plot
from rlarith.traces.writer import TraceWriter

__all__ = [
    "FORMAT",
    "KNOWN_KINDS",
    "META_COLUMNS",
    "VERSION",
    "TraceError",
    "TraceFolderTaken",
    "TraceStorageError",
    "TraceWriter",
    "Traces",
    "export",
    "format_summary",
    "missing_steps",
    "missing_text",
    "open",
    "plot",
    "run_trace_dir",
    "trace_gaps",
]
