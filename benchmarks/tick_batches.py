"""How many frames each stream brings to a scoring tick when ticks are fast (as on a GPU), by drain policy.

32 fake sources deliver GPU-like frames (small plane + luma summary) in batches of 8 at 65 frames/s each,
like NVDEC threads on an H200; scoring is replaced by a no-op so ticks take no time, which is the situation
where the per-stream, per-tick work of scoring and detectors limits throughput. Runs on the CPU.

    python benchmarks/tick_batches.py          # whole-batch draining (the engine's policy)
    python benchmarks/tick_batches.py --old    # drain every stream on every tick (the earlier policy)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine.runner as runner  # noqa: E402
from engine.alerts import MemorySink  # noqa: E402
from engine.config import FramewatchConfig, resolve_detectors  # noqa: E402
from engine.media import LumaSummary, SourceStatus, StreamInfo, VideoFrame  # noqa: E402
from engine.runner import Engine, StreamSpec  # noqa: E402
from engine.sources import SourceOptions  # noqa: E402
from engine.sources.base import Source  # noqa: E402
from kernels import luma_summary as ks  # noqa: E402

small, hist, rows = ks.luma_summary(torch.randint(16, 236, (8, 360, 640), dtype=torch.uint8), ks.row_stride(360))


class Fake(Source):
    def run(self, queue, stop) -> None:
        queue.put_status(SourceStatus("connected", "", time.time(), info=StreamInfo(url=self.url, live=False)))
        for i in range(0, 240, 8):
            time.sleep(8 / 65)
            for j in range(8):
                summary = LumaSummary(hist[j], rows[j], 6, 360, 640)
                queue.put_video(VideoFrame(pts=(i + j) / 30, duration=1 / 30, luma=None, small=small[j], summary=summary),
                                time.time())
        queue.put_status(SourceStatus("eof", "", time.time()))


def main() -> None:
    runner.open_source = lambda url, opts, faults=None: Fake(url, opts)
    old = "--old" in sys.argv
    if old:
        step = Engine.step
        Engine.step = lambda self, final=False: step(self, True)
    dets = {n: c for n, c in resolve_detectors(FramewatchConfig()).items() if n in ("black", "freeze", "blockiness", "blur", "glitch")}
    eng = Engine(MemorySink(), batch_frames=32, queue_frames=64)
    batches: list[int] = []

    def count(works) -> None:
        batches.append(len(works))
        for rt, w in works:
            rt.stats.frames_scored += len(w.frames)

    eng._dispatch_video = count
    for i in range(32):
        eng.add_stream(StreamSpec(f"s{i}", f"fake{i}", dets, SourceOptions(pace="fast", audio=False)))
    eng.run()
    frames = sum(rt.stats.frames_scored for rt in eng.streams.values())
    print(f"{'every tick' if old else 'whole batches'}: {frames} frames in {sum(batches)} stream-batches, "
          f"{frames / sum(batches):.1f} frames per stream per tick")


if __name__ == "__main__":
    main()
