"""Caption preprocessing as upstream does it before T5, at sampling and in training (spec B.4, D.4, G16).

Upstream's ``_text_preprocessing`` / ``_clean_caption`` are diffusers' PixArt-alpha functions, unchanged
(same regexes in the same order) from diffusers 0.27.2 to today; osp calls diffusers' own copy so the
cleaning stays character-for-character upstream's. Full cleaning needs beautifulsoup4 and ftfy
(``pip install 'osp[captions]'``); without them upstream warns and falls back to lower() + strip(),
and so does osp.
"""
from __future__ import annotations

import importlib.util
import logging
import warnings
from typing import Callable, List, Optional, Sequence

logger = logging.getLogger(__name__)
_CLEANER: Optional[Callable[[str], str]] = None
_WARNED = False


def cleaning_unavailable() -> Optional[str]:
    """Why full caption cleaning cannot run here (None when it can)."""
    missing = [m for m, pkg in (("bs4", "beautifulsoup4"), ("ftfy", "ftfy")) if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (pip install beautifulsoup4 ftfy, or 'osp[captions]')"
    try:
        _cleaner()
    except Exception as exc:  # diffusers' PixArt module needs transformers
        return f"diffusers' caption cleaner could not be imported ({type(exc).__name__}: {exc})"
    return None


def _cleaner() -> Callable[[str], str]:
    global _CLEANER
    if _CLEANER is None:
        from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import PixArtAlphaPipeline

        # _clean_caption reads only self.bad_punct_regex, a class attribute.
        _CLEANER = lambda caption: PixArtAlphaPipeline._clean_caption(PixArtAlphaPipeline, caption)  # noqa: E731
    return _CLEANER


def clean_caption(caption: str) -> str:
    """Upstream's (and PixArt-alpha's) caption cleaning, once (needs beautifulsoup4 and ftfy)."""
    return _cleaner()(caption)


def preprocess_captions(captions: Sequence[str], clean: bool = True) -> List[str]:
    """Upstream's ``_text_preprocessing``: with ``clean`` (and bs4, ftfy available) each caption is
    cleaned twice; otherwise lower() and strip(). A missing package costs one warning per process."""
    global _WARNED
    if clean:
        why = cleaning_unavailable()
        if why is not None:
            if not _WARNED:
                warnings.warn(f"caption cleaning off: {why}; prompts are only lower-cased and stripped, as upstream "
                              "does in that case", stacklevel=3)
                _WARNED = True
            clean = False
    if clean:
        f = _cleaner()
        return [f(f(c)) for c in captions]
    return [c.lower().strip() for c in captions]
