"""Annotation: segments, the annotator prompt and clients, the reply parser, and spans -> token masks.

Entry point: `annotate_batch(annotator, requests) -> list[Annotation]`; then `annotate.spans` turns each
annotation's character spans into a capped token mask and route ids.
"""

from megatron_trace.annotate.pipeline import (
    Annotation,
    AnnotationRequest,
    Annotator,
    Completion,
    annotate_batch,
    annotation_metrics,
)

__all__ = ["Annotation", "AnnotationRequest", "Annotator", "Completion", "annotate_batch", "annotation_metrics"]
