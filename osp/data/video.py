"""Video decoding with PyAV that reads only the frames a window needs.

``VideoReader(path)`` opens the file and knows its frame count; ``reader.read(indices)`` seeks to
the key frame at or before the first wanted frame and decodes forward only to the last one, so a
17-frame window of a long file costs one GOP plus 17 frames, never the whole file.

Frame i is the frame whose presentation time is i / fps after the stream's start (the rule decord
and torchvision use for constant-frame-rate files). A file without timestamps is decoded from its
start, counting frames. A frame count missing from the container is counted by demuxing the packets
(no decoding). Every failure is a ``DecodeError`` whose message says what is wrong with the file.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction
from typing import Dict, List, Optional

import numpy as np


class DecodeError(Exception):
    """A file that cannot give the frames asked for (missing, corrupt, truncated, no frames)."""


def _av():
    try:
        import av
    except ImportError:
        raise ImportError("decoding video needs PyAV: pip install av (or pip install 'osp[data]')") from None
    return av


class VideoReader:
    """The first video stream of ``path``; ``frames`` is its frame count (0 means no frames).

    Use as a context manager, or call ``close()``.
    """

    def __init__(self, path: str):
        av = _av()
        try:
            self._container = av.open(path)
        except FileNotFoundError:
            raise DecodeError("file not found") from None
        except Exception as exc:  # PyAV raises its FFmpegError family, OSError, ValueError, ...
            raise DecodeError(f"cannot open ({_describe(exc)})") from None
        try:
            if not self._container.streams.video:
                raise DecodeError("no video stream")
            self._stream = self._container.streams.video[0]
            self.frames = self._count()
        except DecodeError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise DecodeError(f"cannot read the stream ({_describe(exc)})") from None

    def _count(self) -> int:
        n = int(self._stream.frames or 0)
        if n > 0:
            return n
        n = sum(1 for packet in self._container.demux(self._stream) if packet.size)
        self._container.seek(0)
        return n

    def _rate(self) -> Optional[Fraction]:
        rate = self._stream.average_rate or self._stream.guessed_rate
        return Fraction(rate) if rate else None

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """uint8 RGB frames (len(indices), H, W, 3) at ``indices`` (in any order, repeats allowed)."""
        wanted = sorted(set(int(i) for i in indices))
        if not wanted:
            raise ValueError("VideoReader.read: no frame indices")
        if wanted[0] < 0 or wanted[-1] >= self.frames:
            raise ValueError(f"VideoReader.read: indices {wanted[0]}..{wanted[-1]} outside the file's "
                             f"{self.frames} frames")
        self._last = None
        try:
            got = self._decode(wanted)
        except DecodeError:
            raise
        except Exception as exc:
            where = "before its first frame" if self._last is None else f"after frame {self._last}"
            raise DecodeError(f"truncated or corrupt: decoding failed {where} of {self.frames} "
                              f"({_describe(exc)})") from None
        return np.stack([got[int(i)] for i in indices])

    def _decode(self, wanted: List[int]) -> Dict[int, np.ndarray]:
        stream, rate, tb = self._stream, self._rate(), self._stream.time_base
        start = self._stream.start_time or 0
        timed = rate is not None and tb is not None
        if timed and wanted[0] > 0:
            target = start + int(Fraction(wanted[0]) / (rate * Fraction(tb)))
            self._container.seek(target, stream=stream, backward=True, any_frame=False)
            got = self._collect(wanted, rate, tb, start)
            if got is not None:
                return got
            self._container.seek(0)  # the seek landed past the window or the frames carry no times
        elif wanted[0] > 0:
            self._container.seek(0)
        got = self._collect(wanted, rate if timed else None, tb, start)
        if got is None:
            self._container.seek(0)
            got = self._collect_counting(wanted)
        return got

    def _collect(self, wanted: List[int], rate, tb, start) -> Optional[Dict[int, np.ndarray]]:
        """Frames by presentation time; None when the decode starts after wanted[0] or a frame has
        no timestamp (the caller then falls back to decoding from the start, counting frames)."""
        if rate is None:
            return None
        want, last = set(wanted), wanted[-1]
        got: Dict[int, np.ndarray] = {}
        prev_i, prev_frame = None, None
        for frame in self._container.decode(self._stream):
            if frame.pts is None:
                return None
            i = round((frame.pts - start) * Fraction(tb) * rate)
            self._last = i
            if prev_i is None and i > wanted[0]:
                return None
            if prev_i is not None and i <= prev_i:
                continue  # a repeated timestamp: the first frame keeps the index
            if prev_i is not None:  # a timestamp gap (variable frame rate): show the previous frame
                for j in range(prev_i + 1, min(i, last + 1)):
                    if j in want:
                        got[j] = prev_frame.to_ndarray(format="rgb24")
            if i in want:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
            prev_i, prev_frame = i, frame
        self._check_complete(wanted, got)
        return got

    def _collect_counting(self, wanted: List[int]) -> Dict[int, np.ndarray]:
        want, last = set(wanted), wanted[-1]
        got: Dict[int, np.ndarray] = {}
        for i, frame in enumerate(self._container.decode(self._stream)):
            self._last = i
            if i in want:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
        self._check_complete(wanted, got)
        return got

    def _check_complete(self, wanted: List[int], got: Dict[int, np.ndarray]) -> None:
        missing = [i for i in wanted if i not in got]
        if missing:
            raise DecodeError(f"truncated: the file ends before frame {missing[0]} "
                              f"(its header says {self.frames} frames)")

    def close(self) -> None:
        container = getattr(self, "_container", None)
        if container is not None:
            container.close()
            self._container = None

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# --- writing ----------------------------------------------------------------------------------------


def encoder_name(codec: str) -> str:
    """PyAV encoder for "h264" (libx264 when present) or "mpeg4"."""
    av = _av()
    if codec == "h264":
        for name in ("libx264", "h264", "libopenh264"):
            if name in av.codecs_available:
                return name
        raise ValueError("codec='h264': this PyAV build has no H.264 encoder; use codec='mpeg4'")
    if codec == "mpeg4":
        return "mpeg4"
    raise ValueError(f"codec={codec!r}; expected 'h264' or 'mpeg4'")


def write_mp4(path: str, frames, fps: int = 24, codec: str = "h264", *, crf: int = 12,
              gop: Optional[int] = None) -> None:
    """uint8 frames (T, H, W, 3) (a numpy array or CPU tensor; T may be 0) -> an mp4 at ``path``
    (yuv420p), written to a temporary name and renamed into place. An odd height or width is padded
    by one black row or column (yuv420p needs even sizes). ``crf``: H.264 quality (0 lossless; upstream
    sampled at 5, imageio's quality 9); ``gop``: frames between key frames (the encoder's default
    when None). The same frames always give the same bytes."""
    av = _av()
    frames = np.asarray(frames.cpu() if hasattr(frames, "cpu") else frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_mp4: frames are {frames.shape} {frames.dtype}; expected uint8 (T, H, W, 3)")
    T, H, W, _ = frames.shape
    if H < 1 or W < 1:
        raise ValueError(f"write_mp4: frame size {H}x{W}; expected at least 1x1")
    if H % 2 or W % 2:
        frames = np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)))
        H, W = H + H % 2, W + W % 2
    name = encoder_name(codec)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream(name, rate=fps)
            stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
            # x264's macroblock-tree rate control gave run-to-run different bitstreams for the same
            # frames here; without it (and on one thread) the file is a function of the frames.
            options = ({"crf": str(crf), "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}
                       if name == "libx264" else {})
            if gop is not None:
                options["g"] = str(gop)
            stream.options = options
            if name == "mpeg4":
                stream.codec_context.bit_rate = 8_000_000
            for t, array in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
                frame.pts, frame.time_base = t, Fraction(1, fps)
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
            if T == 0:
                container.start_encoding()  # a header with no frames (PyAV writes nothing otherwise)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
