"""Our Relax passes, one per file."""

from .rewrite_lut_matmul import LayerReport, RewriteReport, rewrite_lut_matmul

__all__ = ["LayerReport", "RewriteReport", "rewrite_lut_matmul"]
