"""Sampling pipelines: ``TextToVideoPipeline`` (Open-Sora-Plan v1.0's VideoGenPipeline over osp's
models, diffusers conventions) and the samplers ``osp sample --sample_method`` offers.

Submodules are imported on first use: ``osp.pipelines.schedulers`` (the sampler names) is cheap,
the pipeline itself needs diffusers.
"""
from .._utils import lazy_exports

_EXPORTS = {
    "TextToVideoPipeline": ".text_to_video", "TextToVideoPipelineOutput": ".text_to_video",
    "OUTPUT_TYPES": ".text_to_video", "TEXT_MASKS": ".text_to_video", "load_text_encoder": ".text_to_video",
    "parse_version": ".text_to_video",
    "SAMPLE_METHODS": ".schedulers", "UPSTREAM_SCHEDULERS": ".schedulers", "IDDPMSampler": ".schedulers",
    "make_scheduler": ".schedulers", "scheduler_config": ".schedulers", "scheduler_name": ".schedulers",
    "clean_caption": "..data.captions", "preprocess_captions": "..data.captions",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
