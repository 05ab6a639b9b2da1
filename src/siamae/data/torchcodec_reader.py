"""torchcodec as the video decoder (``data.video_backend: torchcodec``), beside PyAV.

torchcodec (pip ``siamae[torchcodec]``) decodes with the system's FFmpeg shared libraries
(libavcodec, libavformat, libavutil, ... of FFmpeg 4 to 8; on Debian/Ubuntu
``apt-get install ffmpeg``, or the ``libavcodec-dev``-style packages; conda ``ffmpeg``). Where
either is missing :func:`check_torchcodec` raises a one-line :class:`DataError` naming both.

Frames are numbered by torchcodec's exact seek mode (a scan of the file's packets when it is
opened: frame i is the i-th in presentation order), which is the index's numbering for the videos
``siamae data videos`` writes and for ordinary files; PyAV stays the default because its index
also copes with containers whose headers lie (AVI "dropped frame" chunks). ``device="cuda"``
decodes on the GPU (NVDEC) and copies the frames back for cropping; it needs torchcodec's CUDA
build and a loader that does not fork after CUDA starts (``data.num_workers: 0``).
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from siamae.errors import DataError

#: What to install, in one line (the CLI prints it and exits 2).
MISSING = (
    "data.video_backend=torchcodec needs torchcodec and FFmpeg's shared libraries: "
    "pip install 'siamae[torchcodec]' and apt-get install ffmpeg (Debian/Ubuntu; conda: "
    "conda install ffmpeg), or use data.video_backend=pyav"
)
#: What torchcodec raises for a file it cannot decode (the dataset skips and counts it).
TORCHCODEC_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, ValueError, IndexError)


def _decoder_class() -> Any:
    try:
        from torchcodec.decoders import VideoDecoder
    except (ImportError, OSError, RuntimeError) as err:
        # torchcodec raises RuntimeError (it tried each FFmpeg major version) without the libraries
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{MISSING} ({type(err).__name__}: {reason[:160]})") from None
    # torchcodec 0.17 and later import without FFmpeg (its image decoders do not need it) and
    # fail only when a video is opened; the flag it sets at import says whether FFmpeg loaded
    try:
        from torchcodec._core import ops
    except ImportError:  # another layout: the decoder's own error says it when used
        return VideoDecoder
    if getattr(ops, "_FFMPEG_AVAILABLE", True) is False:
        raise DataError(f"{MISSING} (FFmpeg's shared libraries were not found)")
    return VideoDecoder


def check_torchcodec() -> None:
    """Raise the one-line :class:`DataError` when torchcodec or FFmpeg's libraries are missing."""
    _decoder_class()


def torchcodec_frames(
    path: str, wanted: list[int], threads: int = 1, device: str = "cpu"
) -> dict[int, Image.Image]:
    """Frames ``wanted`` (sorted, unique) of a video file, decoded by torchcodec from the
    nearest keyframe (its exact seek mode), as RGB images."""
    decoder = _decoder_class()(
        path,
        seek_mode="exact",
        dimension_order="NHWC",
        num_ffmpeg_threads=threads,
        device=device,
    )
    batch = decoder.get_frames_at(wanted).data
    pixels = batch.cpu().numpy()
    return {t: Image.fromarray(pixels[k]) for k, t in enumerate(wanted)}
